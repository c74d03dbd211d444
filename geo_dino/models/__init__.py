"""Backbones (registry, checkpoint layouts, loading) and the heads that turn features into maps."""
