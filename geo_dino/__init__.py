"""geo_dino: DINO-family backbones from an area of interest to georeferenced, governed outputs.

Importing the package is light: torch, Prefect and GDAL are imported by the modules that use them.
"""

from geo_dino.errors import GeoDinoError

__version__ = "0.1.0"
__all__ = ["GeoDinoError", "__version__"]
