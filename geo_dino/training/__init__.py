"""Training: DINO pretraining (recipe, data, loop) and supervised heads on labelled rasters."""
