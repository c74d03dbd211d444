"""What a run leaves: COGs, vectors, the feature cube, STAC, QGIS styles and project."""
