"""One run's stages: the typed plan, the run folder, inference over tiles, writing the outputs."""
