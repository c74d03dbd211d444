"""Evaluation of frozen features on labelled images: DINO's weighted k-NN and a linear probe.

The data flow, top to bottom:

1. :func:`load_labelled` reads a labelled image set, from a CSV (``path,class[,class_index],split``, paths
   relative to the CSV's folder, ``split`` train|test) or an image-folder tree: ``ROOT/train/<class>/*`` and
   ``ROOT/test/<class>/*``, or ``ROOT/<class>/*`` split per class with a seeded permutation (stratified:
   ``round(n · test_fraction)`` test images per class, at least one of each). Every path is checked before
   a pixel is read: relative, inside the root after resolving symlinks, a regular file under the size limit,
   and JPEG/PNG/TIFF by its magic bytes. In folder trees, files beside the class folders (README, labels.csv)
   and hidden files are ignored; anything else in a class folder must be an image.
2. :func:`prepare_images` decodes (Pillow for JPEG/PNG, rasterio for GeoTIFF), selects bands (1-based, repeats
   allowed), scales to [0, 1] (uint8: /255; any other dtype needs an explicit ``value_range``) and resizes
   bilinearly (antialiased) to one size: ``size`` × ``size``, or by default the first training image's own
   height and width, each rounded up to a multiple of the patch size (EuroSAT's 64×64 stays 64×64 at
   patch 16).
3. Features: :func:`model_features` normalises with the checkpoint's mean/std and takes the CLS token after
   the final norm (:func:`geo_dino.models.backbone.extract`), the mean of the patch tokens, or both
   concatenated (``pool`` = ``cls`` | ``mean`` | ``cls+mean``); :func:`pixel_features` is the raw-pixel
   baseline (pixels standardised per band with the training images' mean/std, flattened).
4. Classifiers: :func:`knn_scores` is ``knn_classifier`` of DINO's ``eval_knn.py`` (L2-normalised features,
   cosine similarity, top-k neighbours, votes weighted ``exp(sim / T)``), chunked over the test set so memory
   stays bounded; :func:`linear_probe` fits scikit-learn's L2 ``LogisticRegression`` on standardised features,
   chooses ``C`` on a stratified, seeded held-out part of the training split, and refits on all of it.
5. An :class:`EvalResult` (accuracy, per-class accuracy, confusion matrix, parameters, feature and data
   identity, timings) is written as JSON by :meth:`EvalResult.write_json`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from geo_dino.errors import ConfigError, SourceError

POOLS = ("cls", "mean", "cls+mean")
METHODS = ("knn", "linear")
SPLITS = ("train", "test")
CSV_COLUMNS = ("path", "class", "class_index", "split")
# candidates for the linear probe's inverse regularisation C (standardised features; raw pixels at 64x64 peak
# near 1e-4, random-init ViT features between 0.1 and 100)
DEFAULT_C = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"II*\x00": "tiff", b"MM\x00*": "tiff",
          b"II+\x00": "tiff", b"MM\x00+": "tiff"}
_MAX_CSV_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ImageLimits:
    """What a labelled set may hold: refused beyond these (decompression bombs, runaway memory)."""

    max_file_bytes: int = 64 * 2**20
    max_pixels: int = 4096 * 4096  # per image, height × width
    max_bands: int = 64
    max_images: int = 1_000_000
    max_prepared_bytes: int = 8 * 2**30  # the decoded, resized float32 set held in memory


@dataclass(frozen=True)
class LabelledImage:
    """One checked image file: resolved path (inside the set's root), format, class index, split."""

    path: Path
    fmt: str  # jpeg | png | tiff (from the magic bytes)
    label: int
    split: str


@dataclass(frozen=True)
class LabelledSet:
    """A labelled image set: class names by index and the checked images of each split."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[LabelledImage, ...]
    test: tuple[LabelledImage, ...]
    record: Mapping[str, Any]  # source, layout, split rule (goes into the result)


@dataclass(frozen=True)
class PreparedImages:
    """Decoded images scaled to [0, 1] at one size, ``(N, band, row, col)`` float32 tensors, and labels."""

    train: Any
    train_labels: Any
    test: Any
    test_labels: Any
    classes: tuple[str, ...]
    record: Mapping[str, Any]  # the data record plus size, bands, value range
    seconds: float


@dataclass(frozen=True)
class FeatureSet:
    """Features ``(N, D)`` float32 of both splits, with what produced them."""

    train: Any
    train_labels: Any
    test: Any
    test_labels: Any
    classes: tuple[str, ...]
    features: Mapping[str, Any]  # kind, backbone identity, pool, dim
    data: Mapping[str, Any]
    seconds: Mapping[str, float]


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: accuracies, confusion matrix (rows true, columns predicted), parameters, identity."""

    method: str
    top1: float
    top5: float | None  # None with fewer than 5 classes
    per_class: dict[str, float | None]  # None: no test image of that class
    confusion: list[list[int]]
    classes: list[str]
    n_train: int
    n_test: int
    params: dict[str, Any]
    features: dict[str, Any]
    data: dict[str, Any]
    seconds: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain dict (nested dataclass fields included), ready for JSON."""
        return asdict(self)

    def summary(self) -> str:
        """One line: method, parameters, accuracies, features."""
        f = self.features
        what = "raw pixels" if f.get("kind") == "raw-pixels" else f"{f.get('arch')} ({f.get('source')})"
        params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
                          if k in ("k", "temperature", "C"))
        top5 = f" top-5 {self.top5:.4f}" if self.top5 is not None else ""
        size = "x".join(str(s) for s in self.data.get("size", ()))
        return (f"{self.method} {params}: top-1 {self.top1:.4f}{top5} on {self.n_test} test / {self.n_train} "
                f"train images, {len(self.classes)} classes; {what}, {size} px, pool {f.get('pool')}, "
                f"{sum(self.seconds.values()):.1f} s")

    def write_json(self, path: str | Path) -> Path:
        """Write the result with software versions and the git commit (atomically: temp file, rename)."""
        from geo_dino.governance.provenance import git_info, software_versions

        path = Path(path)
        rec = {"schema": "geo_dino.evaluation/1", **self.to_dict(), "software": software_versions(),
               "git": git_info()}
        from geo_dino.files import write_text_atomic

        try:
            write_text_atomic(path, json.dumps(rec, indent=2, default=str) + "\n")
        except OSError as exc:
            raise SourceError(f"cannot write {path}: {exc}; choose a writable --out path") from None
        return path


# ---------------------------------------------------------------------------------------------- loading


def _sniff(path: Path) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(8)
    return next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), None)


def _check_file(root: Path, rel: str, limits: ImageLimits, where: str) -> tuple[Path, str]:
    """``root / rel`` resolved, refused unless a relative path to an image file inside ``root``."""
    if not rel or "\x00" in rel:
        raise ConfigError(f"{where}: empty or invalid path {rel!r}")
    if "://" in rel or rel.lower().startswith("/vsi"):
        raise SourceError(f"{where}: {rel!r}: URLs and virtual paths are refused; "
                          f"give a path relative to {root}")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise SourceError(f"{where}: {rel!r} is absolute; give paths relative to the dataset root {root}")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise SourceError(f"{where}: {rel!r} leaves the dataset root ('..' is refused); "
                          f"keep images under {root}")
    try:
        real = (root / rel).resolve(strict=True)
    except FileNotFoundError:
        raise SourceError(f"{where}: image {root / rel} not found; fix the path or add the file") from None
    except (OSError, RuntimeError) as exc:  # permissions, symlink loops
        raise SourceError(f"{where}: {root / rel} cannot be resolved: {exc}") from None
    if not real.is_relative_to(root):
        raise SourceError(f"{where}: {rel!r} resolves to {real}, outside the dataset root {root} "
                          "(a symlink out of the root is refused); copy the file under the root")
    if not real.is_file():
        raise SourceError(f"{where}: {root / rel} is not a regular file")
    if real.stat().st_size > limits.max_file_bytes:
        raise SourceError(f"{where}: {root / rel} is larger than {limits.max_file_bytes} bytes; refused")
    fmt = _sniff(real)
    if fmt is None:
        raise SourceError(f"{where}: {root / rel} is not a JPEG, PNG or TIFF image (by its first bytes); "
                          "remove it from the set")
    return real, fmt


def load_labelled(data: str | Path, *, test_fraction: float = 0.25, seed: int = 0,
                  limits: ImageLimits = ImageLimits()) -> LabelledSet:
    """A labelled set from a CSV file or an image-folder tree (see the module docstring for the layouts).

    ``test_fraction`` and ``seed`` apply only to the ``ROOT/<class>/*`` layout, which has no split of its own.
    """
    p = Path(data)
    if not p.exists():
        raise SourceError(f"{p}: labelled data not found; give a labels CSV or an image folder")
    if p.is_dir():
        ds = _load_folder(p.resolve(), test_fraction, seed, limits)
    elif p.suffix.lower() == ".csv":
        ds = _load_csv(p.resolve(), limits)
    else:
        raise ConfigError(f"{p}: neither a .csv file nor a folder; "
                          "give labels.csv or ROOT with class folders")
    if len(ds.train) + len(ds.test) > limits.max_images:
        raise ConfigError(f"{p}: more than {limits.max_images} images; refused")
    for split in SPLITS:
        if not getattr(ds, split):
            raise ConfigError(f"{p}: the {split} split is empty; "
                              "every evaluation needs train and test images")
    in_train = {im.label for im in ds.train}
    only_test = sorted({ds.classes[im.label] for im in ds.test} - {ds.classes[i] for i in in_train})
    if only_test:
        raise ConfigError(f"{p}: classes {only_test} have test images but no training image; no classifier "
                          "can predict them: add training images or drop their test images")
    return ds


def _load_csv(path: Path, limits: ImageLimits) -> LabelledSet:
    if path.stat().st_size > _MAX_CSV_BYTES:
        raise ConfigError(f"{path}: larger than {_MAX_CSV_BYTES} bytes; refused")
    root = path.parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        unknown = [c for c in header if c not in CSV_COLUMNS]
        missing = [c for c in ("path", "class", "split") if c not in header]
        if unknown or missing or len(set(header)) != len(header):
            raise ConfigError(f"{path}: columns {header}: unknown {unknown}, missing {missing}; "
                              f"the columns are path,class,split and optionally class_index")
        rows = []
        for line, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise ConfigError(f"{path}:{line}: {len(header)} fields expected")
            rows.append((line, row))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    index: dict[str, int] = {}
    if "class_index" in header:
        for line, row in rows:
            try:
                i = int(row["class_index"])
            except ValueError:
                raise ConfigError(f"{path}:{line}: class_index {row['class_index']!r} "
                                  "is not an integer") from None
            if index.setdefault(row["class"], i) != i:
                raise ConfigError(f"{path}:{line}: class {row['class']!r} has class_index {i} here and "
                                  f"{index[row['class']]} above; one index per class")
        if sorted(index.values()) != list(range(len(index))):
            raise ConfigError(f"{path}: class_index values {sorted(set(index.values()))} "
                              f"are not 0..{len(index) - 1}, one per class")
    else:
        index = {c: i for i, c in enumerate(sorted({row["class"] for _, row in rows}))}
    classes = tuple(sorted(index, key=index.__getitem__))
    if any(not c for c in classes):
        raise ConfigError(f"{path}: an empty class name")
    seen: set[Path] = set()
    images: dict[str, list[LabelledImage]] = {s: [] for s in SPLITS}
    for line, row in rows:
        if row["split"] not in SPLITS:
            raise ConfigError(f"{path}:{line}: split {row['split']!r}; use train or test")
        real, fmt = _check_file(root, row["path"], limits, f"{path}:{line}")
        if real in seen:
            raise ConfigError(f"{path}:{line}: {row['path']} is listed twice")
        seen.add(real)
        images[row["split"]].append(LabelledImage(real, fmt, index[row["class"]], row["split"]))
    record = {"source": str(path), "layout": "csv", "split": "the CSV's split column",
              "csv_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return LabelledSet(root, classes, tuple(images["train"]), tuple(images["test"]), record)


def _class_files(folder: Path, root: Path, limits: ImageLimits) -> list[tuple[Path, str]]:
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue  # hidden files (.DS_Store and the like)
        if entry.is_dir():
            raise ConfigError(f"{entry.path}: a folder inside a class folder; "
                              "the layout is ROOT/<class>/<image> or ROOT/train|test/<class>/<image>")
        out.append(_check_file(root, os.path.relpath(entry.path, root), limits, str(folder)))
    return out


def _class_dirs(folder: Path) -> list[Path]:
    """The class folders (files beside them, such as a README or labels.csv, are not part of the set)."""
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ConfigError(f"{folder}: no class folders; the layout is ROOT/<class>/<image> or "
                          "ROOT/train|test/<class>/<image>")
    return dirs


def _load_folder(root: Path, test_fraction: float, seed: int, limits: ImageLimits) -> LabelledSet:
    has = {s: (root / s).is_dir() for s in SPLITS}
    if any(has.values()):
        if not all(has.values()):
            raise ConfigError(f"{root}: has {'train' if has['train'] else 'test'}/ but not "
                              f"{'test' if has['train'] else 'train'}/; "
                              "give both or use ROOT/<class>/ folders")
        train_dirs = _class_dirs(root / "train")
        test_dirs = _class_dirs(root / "test")
        classes = tuple(d.name for d in train_dirs)
        only_test = sorted({d.name for d in test_dirs} - set(classes))
        if only_test:
            raise ConfigError(f"{root}: classes {only_test} have test images but no training folder; "
                              "no classifier can predict them: add training images or drop their test images")
        split = {s: [LabelledImage(real, fmt, classes.index(d.name), s)
                     for d in dirs for real, fmt in _class_files(d, root, limits)]
                 for s, dirs in (("train", train_dirs), ("test", test_dirs))}
        record: dict[str, Any] = {"source": str(root), "layout": "folder ROOT/train|test/<class>/",
                                  "split": "the train/ and test/ folders"}
        return LabelledSet(root, classes, tuple(split["train"]), tuple(split["test"]), record)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction {test_fraction}: must be between 0 and 1")
    dirs = _class_dirs(root)
    classes = tuple(d.name for d in dirs)
    rng = np.random.default_rng(seed)
    train: list[LabelledImage] = []
    test: list[LabelledImage] = []
    for label, d in enumerate(dirs):
        files = _class_files(d, root, limits)
        if len(files) < 2:
            raise ConfigError(f"{d}: {len(files)} image(s); a seeded split needs at least 2 per class")
        n_test = min(len(files) - 1, max(1, math.floor(len(files) * test_fraction + 0.5)))
        is_test = np.zeros(len(files), bool)
        is_test[rng.permutation(len(files))[:n_test]] = True
        for (real, fmt), t in zip(files, is_test, strict=True):
            (test if t else train).append(LabelledImage(real, fmt, label, "test" if t else "train"))
    record = {"source": str(root), "layout": "folder ROOT/<class>/",
              "split": f"seeded stratified: per class (sorted), files sorted by name, "
                       f"a numpy default_rng({seed}) permutation; round(n * {test_fraction}) test images "
                       "per class, at least 1 train and 1 test",
              "test_fraction": test_fraction, "seed": seed}
    return LabelledSet(root, classes, tuple(train), tuple(test), record)


# ---------------------------------------------------------------------------------------------- pixels


def read_image(path: str | Path, *, bands: Sequence[int] | None = None,
               value_range: tuple[float, float] | None = None,
               limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """One image as float32 ``(band, row, col)`` in [0, 1]: JPEG/PNG (alpha dropped) or GeoTIFF (any bands).

    ``bands`` are 1-based and may repeat (``(1, 1, 1)`` makes grey RGB); None keeps every band. uint8 data is
    divided by 255; other dtypes are scaled ``(x - low) / (high - low)`` by ``value_range`` (required) and
    clipped. GeoTIFF nodata is not masked (classification chips have none).
    """
    path = Path(path)
    fmt = _sniff(path)
    if fmt in ("jpeg", "png"):
        arr = _read_pillow(path, limits)
    elif fmt == "tiff":
        arr = _read_tiff(path, bands, limits)
        bands = None  # selected while reading
    else:
        raise SourceError(f"{path}: not a JPEG, PNG or TIFF image")
    if bands is not None:
        bad = [b for b in bands if not 1 <= b <= arr.shape[0]]
        if bad or not bands:
            raise ConfigError(f"bands {list(bands)}: {path} has bands 1..{arr.shape[0]}")
        arr = arr[[b - 1 for b in bands]]
    if value_range is None:
        if arr.dtype != np.uint8:
            raise ConfigError(f"{path}: {arr.dtype} pixels need a value_range "
                              "(the values that map to 0 and 1, e.g. 0,10000 for Sentinel-2 reflectance "
                              "x 10000); only uint8 is scaled by default")
        low, high = 0.0, 255.0
    else:
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ConfigError(f"value_range {value_range}: the upper value must exceed the lower")
    return np.clip((arr.astype(np.float32) - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _read_pillow(path: Path, limits: ImageLimits) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=["JPEG", "PNG"]) as src:
            w, h = src.size
            if w * h > limits.max_pixels:
                raise SourceError(f"{path}: {w}x{h} pixels, "
                                  f"more than the limit of {limits.max_pixels}; refused")
            mode = src.mode
            im: Image.Image = src
            if mode in ("RGBA", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = src.convert("RGB")  # alpha and palettes are not spectral bands
            elif mode in ("LA", "La", "1"):
                im = src.convert("L")
            arr = np.asarray(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise SourceError(f"{path}: cannot be decoded as JPEG/PNG: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _read_tiff(path: Path, bands: Sequence[int] | None, limits: ImageLimits) -> np.ndarray:
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    from geo_dino.inputs.sources import gdal_env

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # chips need no georeference here
            with gdal_env(), rasterio.open(path, driver="GTiff") as src:  # no other driver is ever tried
                if src.width * src.height > limits.max_pixels or src.count > limits.max_bands:
                    raise SourceError(f"{path}: {src.width}x{src.height} pixels x {src.count} bands "
                                      f"is beyond the limits ({limits.max_pixels} pixels, "
                                      f"{limits.max_bands} bands); refused")
                idx = list(bands) if bands is not None else list(range(1, src.count + 1))
                bad = [b for b in idx if not 1 <= b <= src.count]
                if bad or not idx:
                    raise ConfigError(f"bands {idx}: {path} has bands 1..{src.count}")
                return src.read(indexes=idx)
    except RasterioError as exc:
        raise SourceError(f"{path}: cannot be read as GeoTIFF: {exc}") from None


def _target_size(first: np.ndarray, size: int | None, patch: int) -> tuple[int, int]:
    if size is not None:
        if size <= 0 or size % patch:
            raise ConfigError(f"size {size}: must be a positive multiple of the patch size {patch}")
        return size, size
    h, w = first.shape[-2:]
    return -(-h // patch) * patch, -(-w // patch) * patch


def prepare_images(dataset: LabelledSet, *, size: int | None = None, patch_size: int = 1,
                   bands: Sequence[int] | None = None, value_range: tuple[float, float] | None = None,
                   limits: ImageLimits = ImageLimits()) -> PreparedImages:
    """Decode, scale to [0, 1] and resize every image once (bilinear, antialiased) to one size.

    ``size`` (square, a multiple of ``patch_size``); None: the first training image's own height and width,
    each rounded up to a multiple of ``patch_size``. Prepare once, evaluate many times (pretraining).
    """
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    images = dataset.train + dataset.test
    first = read_image(images[0].path, bands=bands, value_range=value_range, limits=limits)
    target = _target_size(first, size, patch_size)
    n_bands = first.shape[0]
    need = len(images) * n_bands * target[0] * target[1] * 4
    if need > limits.max_prepared_bytes:
        raise ConfigError(f"{len(images)} images of {n_bands}x{target[0]}x{target[1]} "
                          f"need {need / 2**30:.1f} GiB as float32, "
                          f"more than {limits.max_prepared_bytes / 2**30:.1f} GiB; use a smaller size")
    out = torch.empty((len(images), n_bands, *target), dtype=torch.float32)
    for i, im in enumerate(images):
        arr = first if i == 0 else read_image(im.path, bands=bands, value_range=value_range, limits=limits)
        if arr.shape[0] != n_bands:
            raise SourceError(f"{im.path}: {arr.shape[0]} bands where {images[0].path} has {n_bands}; "
                              "give bands so every image yields the same bands")
        x = torch.from_numpy(arr)
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x[None], size=target, mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = x
    labels = torch.tensor([im.label for im in images], dtype=torch.long)
    n = len(dataset.train)
    record = {**dataset.record, "size": list(target), "n_bands": n_bands,
              "bands": list(bands) if bands is not None else "all",
              "value_range": list(value_range) if value_range is not None else "uint8 / 255",
              "resize": "bilinear, antialiased (torch.nn.functional.interpolate)"}
    return PreparedImages(out[:n], labels[:n], out[n:], labels[n:], dataset.classes, record,
                          time.perf_counter() - t0)


def _prepared(data: LabelledSet | PreparedImages | str | Path, patch: int, **kw: Any) -> PreparedImages:
    if isinstance(data, PreparedImages):
        if kw.get("size") is not None and [kw["size"]] * 2 != data.record["size"]:
            raise ConfigError(f"size {kw['size']}: these images were prepared at {data.record['size']}")
        if kw.get("bands") is not None or kw.get("value_range") is not None:
            raise ConfigError("bands and value_range are fixed when the images are prepared (prepare_images)")
        if any(s % patch for s in data.record["size"]):
            raise ConfigError(f"prepared size {data.record['size']} "
                              f"is not a multiple of the patch size {patch}")
        return data
    ds = data if isinstance(data, LabelledSet) else load_labelled(data)
    return prepare_images(ds, patch_size=patch, **kw)


# ---------------------------------------------------------------------------------------------- features


def embed(model: Any, spec: Any, pixels: Any, *, pool: str = "cls", batch_size: int = 64) -> Any:
    """Features ``(N, D)`` float32 on the CPU of ``pixels`` ``(N, band, row, col)`` in [0, 1].

    Normalised with ``spec.mean``/``spec.std``; ``pool``: ``cls`` (the CLS token after the final norm),
    ``mean`` (mean of the patch tokens) or ``cls+mean`` (both, concatenated). The model runs in eval mode
    under ``torch.inference_mode`` on its own device; its training mode is restored afterwards.
    """
    import torch

    from geo_dino.models.backbone import extract

    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r}: choose one of {list(POOLS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: must be at least 1")
    c = pixels.shape[1]
    if c != len(spec.mean) or c != len(spec.std) or c != spec.in_chans:
        raise ConfigError(f"images have {c} bands; the backbone takes {spec.in_chans} with {len(spec.mean)} "
                          "mean/std values: select bands to match")
    param = next(model.parameters())
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=param.device).view(1, -1, 1, 1)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, pixels.shape[0], batch_size):
                x = (pixels[i:i + batch_size].to(param.device) - mean) / std
                f = extract(model, x.to(param.dtype))
                parts = ([f.global_] if pool in ("cls", "cls+mean") else []) + \
                        ([f.dense.mean(dim=(2, 3))] if pool in ("mean", "cls+mean") else [])
                out.append(torch.cat(parts, dim=1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def model_features(model: Any, spec: Any, data: LabelledSet | PreparedImages | str | Path, *,
                   pool: str = "cls", size: int | None = None, batch_size: int = 64,
                   bands: Sequence[int] | None = None,
                   value_range: tuple[float, float] | None = None) -> FeatureSet:
    """Features of an in-memory backbone (a timm ViT as built by
    :func:`geo_dino.models.backbone.build_backbone`)."""
    prep = _prepared(data, spec.patch_size, size=size, bands=bands, value_range=value_range)
    t0 = time.perf_counter()
    train = embed(model, spec, prep.train, pool=pool, batch_size=batch_size)
    test = embed(model, spec, prep.test, pool=pool, batch_size=batch_size)
    ident = {k: getattr(spec, k) for k in ("arch", "source", "sha256", "licence", "seed", "patch_size",
                                             "embed_dim", "in_chans", "adaptation", "mean", "std")}
    features = {"kind": "backbone", **ident, "pool": pool, "dim": int(train.shape[1]),
                "token": "after the final norm (geo_dino.models.backbone.extract)"}
    return FeatureSet(train, prep.train_labels, test, prep.test_labels, prep.classes, features, prep.record,
                      {"prepare": prep.seconds if not isinstance(data, PreparedImages) else 0.0,
                       "features": time.perf_counter() - t0})


def backbone_features(data: LabelledSet | PreparedImages | str | Path, *, arch: str,
                      checkpoint: str | Path | None = None, checkpoint_sha256: str | None = None,
                      accept_licence: str | None = None, seed: int = 0, device: str = "cpu",
                      **kw: Any) -> FeatureSet:
    """Build the backbone (:func:`geo_dino.models.backbone.build_backbone`) and take its features (see
    :func:`model_features` for ``kw``). Random init, when no checkpoint is given, is seeded with ``seed``."""
    from geo_dino.models.backbone import build_backbone

    t0 = time.perf_counter()
    model, spec = build_backbone(arch, checkpoint=Path(checkpoint) if checkpoint else None,
                                 checkpoint_sha256=checkpoint_sha256, accept_licence=accept_licence,
                                 seed=seed)
    try:
        model = model.to(device)
    except (RuntimeError, ValueError) as exc:  # unknown or unavailable device
        raise ConfigError(f"device {device!r}: {exc}") from None
    build = time.perf_counter() - t0
    fs = model_features(model, spec, data, **kw)
    return FeatureSet(fs.train, fs.train_labels, fs.test, fs.test_labels, fs.classes, fs.features, fs.data,
                      {"build": build, **fs.seconds})


def pixel_features(data: LabelledSet | PreparedImages | str | Path, *, size: int | None = None,
                   bands: Sequence[int] | None = None,
                   value_range: tuple[float, float] | None = None) -> FeatureSet:
    """The raw-pixel baseline: pixels standardised per band with the training images' mean and std, then
    flattened to ``(N, band·row·col)``."""
    prep = _prepared(data, 1, size=size, bands=bands, value_range=value_range)
    t0 = time.perf_counter()
    mean = prep.train.mean(dim=(0, 2, 3), keepdim=True)
    std = prep.train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    train = ((prep.train - mean) / std).flatten(1)
    test = ((prep.test - mean) / std).flatten(1)
    features = {"kind": "raw-pixels", "arch": None, "source": None, "sha256": None, "pool": None,
                "dim": int(train.shape[1]), "mean": mean.flatten().tolist(), "std": std.flatten().tolist(),
                "normalisation": "per band, mean/std of the training images"}
    return FeatureSet(train, prep.train_labels, test, prep.test_labels, prep.classes, features, prep.record,
                      {"prepare": prep.seconds if not isinstance(data, PreparedImages) else 0.0,
                       "features": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------- classifiers


def knn_scores(train: Any, train_labels: Any, test: Any, *, n_classes: int, k: int = 20,
               temperature: float = 0.07, max_chunk_bytes: int = 64 * 2**20) -> Any:
    """Class votes ``(N_test, n_classes)`` of DINO's weighted k-NN (``eval_knn.knn_classifier``).

    Features are L2-normalised; each test image's ``k`` most cosine-similar training images vote for their
    class with weight ``exp(sim / temperature)``. Test images go in chunks whose similarity matrix stays under
    ``max_chunk_bytes``.
    """
    import torch
    import torch.nn.functional as F

    if not 1 <= k <= train.shape[0]:
        raise ConfigError(f"k {k}: must be between 1 and the number of training images ({train.shape[0]})")
    if not temperature > 0:
        raise ConfigError(f"temperature {temperature}: must be positive")
    train_n = F.normalize(train.float(), dim=1)
    test_n = F.normalize(test.float(), dim=1)
    labels = train_labels.to(train_n.device)
    chunk = max(1, max_chunk_bytes // (4 * train_n.shape[0]))
    out = torch.zeros((test_n.shape[0], n_classes), dtype=torch.float32, device=train_n.device)
    for i in range(0, test_n.shape[0], chunk):
        sim = test_n[i:i + chunk] @ train_n.T
        dist, idx = sim.topk(k, dim=1, largest=True, sorted=True)
        out[i:i + chunk].scatter_add_(1, labels[idx], (dist / temperature).exp())
    return out


def rank_classes(scores: Any) -> Any:
    """Class indices by descending score; ties go to the lower class index (stable sort)."""
    import torch

    return torch.sort(torch.as_tensor(scores), dim=1, descending=True, stable=True).indices


def _standardise(fit: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both standardised with ``fit``'s mean/std. With more dimensions than ``fit`` rows, both are then given
    in coordinates of the span of ``fit``'s rows: exact for an L2-penalised linear model, whose optimal
    weights lie in that span (w = V b keeps ``x · w`` and ``|w|``), and much faster (raw pixels:
    12288 → N)."""
    mu, sd = fit.mean(0), fit.std(0)
    sd[sd == 0] = 1.0
    a, b = (fit - mu) / sd, (other - mu) / sd
    if a.shape[1] <= a.shape[0]:
        return a, b
    lam, u = np.linalg.eigh(a @ a.T)
    keep = lam > lam.max() * a.shape[0] * np.finfo(np.float64).eps
    v = a.T @ (u[:, keep] / np.sqrt(lam[keep]))  # orthonormal basis (D, r) of the rows' span
    return a @ v, b @ v


def linear_probe(train: Any, train_labels: Any, test: Any, *, n_classes: int,
                 candidates: Sequence[float] = DEFAULT_C, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 1000) -> tuple[np.ndarray, dict[str, Any]]:
    """Test-set class probabilities ``(N_test, n_classes)`` of an L2 logistic regression on standardised
    features, and what was chosen.

    ``C`` is chosen (highest held-out accuracy; ties to the smaller C) on a stratified held-out part of the
    training split (``floor(n · val_fraction)`` images per class, seeded), then the model (and the
    standardisation) is refitted on the whole training split.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x = np.asarray(train, dtype=np.float64)
    y = np.asarray(train_labels)
    xt = np.asarray(test, dtype=np.float64)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction {val_fraction}: must be between 0 and 1")
    if not candidates or any(not c > 0 for c in candidates):
        raise ConfigError(f"candidates {list(candidates)}: give positive values of C")
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        val[rng.permutation(members)[:int(len(members) * val_fraction)]] = True
    if not val.any() or len(np.unique(y[~val])) < 2:
        raise ConfigError(f"the training split ({len(y)} images) is too small to hold out "
                          f"{val_fraction:.0%} per class for choosing the regularisation; "
                          "add training images")

    def fit(a: np.ndarray, b: np.ndarray, c: float) -> tuple[Any, bool]:
        """The classifier, and whether lbfgs converged within ``max_iter``."""
        # probes of up to ~16M feature values run single-threaded: waking BLAS/OpenMP threads every lbfgs
        # iteration costs more than the maths (measured 2.5-40x slower with 2 threads on a busy 2-core
        # machine)
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(1 if a.size < 2**24 else None):
            warnings.simplefilter("always", ConvergenceWarning)
            clf = LogisticRegression(C=c, max_iter=max_iter).fit(a, b)
        return clf, not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    fit_x, val_x = _standardise(x[~val], x[val])
    scores, iters = [], []
    for c in candidates:
        clf, _ = fit(fit_x, y[~val], c)
        scores.append(float((clf.predict(val_x) == y[val]).mean()))
        iters.append(int(clf.n_iter_.max()))
    best = min(zip(candidates, scores, strict=True), key=lambda cs: (-cs[1], cs[0]))[0]
    all_x, test_x = _standardise(x, xt)
    clf, converged = fit(all_x, y, best)
    proba = np.zeros((len(xt), n_classes))
    proba[:, clf.classes_] = clf.predict_proba(test_x)
    info = {"C": best, "candidates": list(candidates),
            "val_accuracy": dict(zip(map(str, candidates), scores, strict=True)),
            "val_fraction": val_fraction, "n_val": int(val.sum()), "seed": seed, "converged": converged,
            "max_iter": max_iter, "iterations": dict(zip(map(str, candidates), iters, strict=True)),
            "final_iterations": int(clf.n_iter_.max()),
            "at_grid_edge": len(candidates) > 1 and best in (min(candidates), max(candidates)),
            "classifier": "sklearn LogisticRegression (lbfgs, L2, multinomial) on features "
                          "standardised with the training mean/std"
                          + (" (solved in the span of the training rows: exact for L2, "
                             "as there are more dimensions than images)"
                             if x.shape[1] > len(y) else "")}
    return proba, info


# ---------------------------------------------------------------------------------------------- results


def _result(method: str, fs: FeatureSet, ranked: Any, params: dict[str, Any], seconds: float,
            top5_width: int, extra: Mapping[str, Any] | None) -> EvalResult:
    ranked = np.asarray(ranked)
    y = np.asarray(fs.test_labels)
    n = len(fs.classes)
    pred = ranked[:, 0]
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class = {c: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
                 for i, c in enumerate(fs.classes)}
    top5 = float((ranked[:, :top5_width] == y[:, None]).any(1).mean()) if n >= 5 else None
    return EvalResult(method=method, top1=float((pred == y).mean()), top5=top5, per_class=per_class,
                      confusion=confusion.tolist(), classes=list(fs.classes), n_train=len(fs.train_labels),
                      n_test=len(y), params=params, features=dict(fs.features), data=dict(fs.data),
                      seconds={**fs.seconds, "classifier": seconds}, extra=dict(extra or {}))


def knn_eval(fs: FeatureSet, *, k: int = 20, temperature: float = 0.07,
             extra: Mapping[str, Any] | None = None) -> EvalResult:
    """Weighted k-NN accuracy of a feature set (top-5: the first ``min(5, k)`` ranked classes, as DINO)."""
    t0 = time.perf_counter()
    scores = knn_scores(fs.train, fs.train_labels, fs.test, n_classes=len(fs.classes), k=k,
                        temperature=temperature)
    ranked = rank_classes(scores).cpu()
    params = {"k": k, "temperature": temperature, "similarity": "cosine", "weights": "exp(sim / temperature)"}
    return _result("knn", fs, ranked, params, time.perf_counter() - t0, min(5, k), extra)


def linear_eval(fs: FeatureSet, *, candidates: Sequence[float] = DEFAULT_C, val_fraction: float = 0.2,
                seed: int = 0, extra: Mapping[str, Any] | None = None) -> EvalResult:
    """Linear-probe accuracy of a feature set (see :func:`linear_probe`)."""
    t0 = time.perf_counter()
    proba, info = linear_probe(fs.train.numpy(), fs.train_labels.numpy(), fs.test.numpy(),
                               n_classes=len(fs.classes), candidates=candidates, val_fraction=val_fraction,
                               seed=seed)
    ranked = np.argsort(-proba, axis=1, kind="stable")
    return _result("linear", fs, ranked, info, time.perf_counter() - t0, 5, extra)


def evaluate_features(fs: FeatureSet, method: str, *, k: int = 20, temperature: float = 0.07,
                      candidates: Sequence[float] = DEFAULT_C, val_fraction: float = 0.2, seed: int = 0,
                      extra: Mapping[str, Any] | None = None) -> EvalResult:
    """``knn`` or ``linear`` on a feature set."""
    if method == "knn":
        return knn_eval(fs, k=k, temperature=temperature, extra=extra)
    if method == "linear":
        return linear_eval(fs, candidates=candidates, val_fraction=val_fraction, seed=seed, extra=extra)
    raise ConfigError(f"method {method!r}: choose one of {list(METHODS)}")


def evaluate_model(model: Any, spec: Any, data: LabelledSet | PreparedImages | str | Path, *,
                   method: str = "knn", pool: str = "cls", batch_size: int = 64, k: int = 20,
                   temperature: float = 0.07, candidates: Sequence[float] = DEFAULT_C, seed: int = 0,
                   extra: Mapping[str, Any] | None = None) -> EvalResult:
    """Evaluate an in-memory backbone (e.g. the teacher every N pretraining steps) on a labelled set.

    Pass :class:`PreparedImages` (from :func:`prepare_images` with the backbone's patch size) to decode the
    images only once; ``extra`` (e.g. ``{"step": 1000}``) is copied into the result.
    """
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: choose one of {list(METHODS)}")
    fs = model_features(model, spec, data, pool=pool, batch_size=batch_size)
    return evaluate_features(fs, method, k=k, temperature=temperature, candidates=candidates, seed=seed,
                             extra=extra)
