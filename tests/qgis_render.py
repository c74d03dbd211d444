"""Open a run's QGIS project in real QGIS and render its visible layers (Debian's python3-qgis).

Usage: QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_render.py RUN_DIR OUT_PNG
       [--size WxH] [--optimize]

Reads RUN_DIR/run.qgs with QgsProject.read, renders the checked layers (layer tree order, top drawn last) in
the project CRS over the output rasters' extent to OUT_PNG (800 px wide by default, height from the extent's
aspect; with --size the extent is centred in a WxH image), white background. --optimize re-saves the PNG as
a 256-colour palette image (Pillow, when installed for this Python). Prints one JSON object: the project's
CRS and extent, the image size, and per layer: valid, CRS authid, extent, renderer type, group path,
visibility, provider, and feature count for vectors.
"""

import argparse
import json
import os
from pathlib import Path

from qgis.core import (
    QgsApplication,
    QgsMapRendererSequentialJob,
    QgsMapSettings,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsRenderContext,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("run_dir", type=Path)
parser.add_argument("out_png", type=Path)
parser.add_argument("--size", help="WxH in pixels (default: 800 wide, height from the extent)")
parser.add_argument("--optimize", action="store_true", help="re-save as a 256-colour palette PNG (Pillow)")
cli = parser.parse_args()
run_dir, out_png = cli.run_dir, cli.out_png
size = tuple(int(v) for v in cli.size.lower().split("x")) if cli.size else None

app = QgsApplication([], False)
app.initQgis()
project = QgsProject.instance()
ok = project.read(str(run_dir / "run.qgs"))
root = project.layerTreeRoot()


def rect(e):
    return [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()]


def group_path(node):
    names = []
    parent = node.parent()
    while parent is not None and parent.parent() is not None:
        names.append(parent.name())
        parent = parent.parent()
    return "/".join(reversed(names))


def symbol_layers(layer):
    """Symbol layers of each symbol of a vector layer's renderer (e.g. [2] for a fill plus a hatch)."""
    renderer = layer.renderer()
    return [sym.symbolLayerCount() for sym in renderer.symbols(QgsRenderContext())] if renderer else []


layers = {}
extent = None
for layer_id, layer in project.mapLayers().items():
    node = root.findLayer(layer_id)
    info = {
        "valid": layer.isValid(),
        "crs": layer.crs().authid(),
        "extent": rect(layer.extent()),
        "group": group_path(node) if node else None,
        "visible": bool(node and node.isVisible()),
        "provider": layer.providerType(),
        "source": project.pathResolver().writePath(layer.source()),
        "renderer": layer.renderer().type() if layer.renderer() else None,
    }
    if isinstance(layer, QgsVectorLayer):
        info["features"] = layer.featureCount()
        info["symbol_layers"] = symbol_layers(layer)
        # a fresh layer from the file alone loads the default style of the GeoPackage's layer_styles table
        fresh = QgsVectorLayer(layer.source(), layer.name(), "ogr")
        info["stored_style"] = {"renderer": fresh.renderer().type() if fresh.renderer() else None,
                                "symbol_layers": symbol_layers(fresh)}
    if isinstance(layer, QgsRasterLayer):
        info["bands"] = layer.bandCount()
        # the outputs' extent: inputs may be larger
        if layer.crs() == project.crs() and info["group"] != "Inputs":
            e = QgsRectangle(layer.extent())
            extent = e if extent is None else extent.combineExtentWith(e) or extent
    layers[layer.name()] = info

visible = root.checkedLayers()  # layer tree order: the first is drawn on top
settings = QgsMapSettings()
settings.setLayers(visible)
settings.setDestinationCrs(project.crs())
settings.setBackgroundColor(QColor(255, 255, 255))
if extent is None:
    extent = project.viewSettings().defaultViewExtent()
if size is None:
    size = (800, max(1, round(800 * extent.height() / extent.width())))
settings.setOutputSize(QSize(*size))
settings.setExtent(extent)  # QGIS widens the extent to the image's aspect, centred
job = QgsMapRendererSequentialJob(settings)
job.start()
job.waitForFinished()
image = job.renderedImage()
saved = image.save(str(out_png), "PNG")
if saved and cli.optimize:
    try:
        from PIL import Image

        with Image.open(out_png) as im:
            im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out_png, optimize=True)
    except ImportError:
        pass
print(json.dumps({"read": ok, "project_crs": project.crs().authid(), "extent": rect(extent),
                  "png": str(out_png), "saved": saved, "size": [image.width(), image.height()],
                  "visible": [lay.name() for lay in visible],
                  "errors": [str(e.message) for e in job.errors()],
                  "layers": layers}), flush=True)
# QGIS 3.22 can crash while tearing down in a headless process; the results are out, leave without teardown
os._exit(0)
