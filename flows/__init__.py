"""Prefect flows wiring geo_dino's stages; the library itself never imports Prefect."""
