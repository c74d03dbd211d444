"""What a run reads: the area of interest, the rasters and their grids, pixel scaling, labels."""
