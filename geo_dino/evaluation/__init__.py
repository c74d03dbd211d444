"""Scoring: segmentation metrics and the k-NN / linear-probe evaluation of frozen features."""
