"""Segmentation metrics from a confusion matrix: IoU, precision, recall, F1, overall accuracy.

Everything works on class *indices* ``0..K-1`` (the order of a :class:`~geo_dino.inputs.labels.ClassTable`;
:func:`values_to_indices` maps label values to indices). Pixels whose target is the ignore index
(:data:`~geo_dino.inputs.labels.IGNORE`, 255) are never counted, whatever was predicted there.

Rules (each tested against scikit-learn):

* ``confusion[t, p]`` counts pixels of target class ``t`` predicted as ``p`` (rows: truth, as scikit-learn).
* A class is **present** when it occurs in the target or in the prediction (its IoU union is not empty).
  mIoU and macro F1 average over present classes only, as scikit-learn's ``average="macro"`` does over the
  labels it sees; a class neither labelled nor predicted has no IoU (``None`` in the JSON form).
* Precision, recall and F1 whose denominator is zero are 0.0 (scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from geo_dino.errors import ConfigError, LabelError
from geo_dino.inputs.labels import IGNORE  # one ignore index for labels, heads and metrics

__all__ = ["confusion_matrix", "segmentation_metrics", "values_to_indices"]


def values_to_indices(labels: np.ndarray, values: Sequence[int], ignore: int = IGNORE) -> np.ndarray:
    """Label values (``uint8``, e.g. a table's ``values`` ``(0, 3, 7)``) → class indices ``0..K-1``, ignore
    kept.

    Raises :class:`LabelError` for a value that is neither a class value nor ``ignore``."""
    arr = np.asarray(labels)
    lut = np.full(256, -1, dtype=np.int16)
    for k, v in enumerate(values):
        lut[int(v)] = k
    lut[ignore] = ignore
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise LabelError(f"label values must be in 0..255, got {int(arr.min())}..{int(arr.max())}")
        arr = arr.astype(np.uint8)
    out = lut[arr]
    if (out < 0).any():
        bad = sorted(set(np.unique(arr[out < 0]).tolist()))
        raise LabelError(f"label values {bad} are not classes {list(values)} nor the ignore value {ignore}")
    return out.astype(np.uint8)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_classes: int,
                     ignore: int = IGNORE) -> np.ndarray:
    """``int64 (K, K)`` counts: ``[t, p]`` = pixels of target index ``t`` predicted as ``p``.

    ``pred`` and ``target`` hold class indices ``0..K-1`` and have the same shape; target pixels equal to
    ``ignore`` are skipped. Raises :class:`ConfigError` for a shape mismatch or an index out of range.
    """
    p = np.asarray(pred).ravel()
    t = np.asarray(target).ravel()
    if np.asarray(pred).shape != np.asarray(target).shape:
        raise ConfigError(f"pred {np.asarray(pred).shape} and target {np.asarray(target).shape} "
                          "differ in shape")
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ConfigError(f"n_classes {n_classes!r} must be a positive integer")
    keep = t != ignore
    p = p[keep].astype(np.int64)
    t = t[keep].astype(np.int64)
    for name, a in (("pred", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ConfigError(f"{name} holds indices {int(a.min())}..{int(a.max())} "
                              f"outside 0..{n_classes - 1} "
                              f"(ignore value {ignore} excepted in the target); map label values to indices "
                              "with values_to_indices")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """JSON-able metrics of a confusion matrix (rows: truth, columns: prediction).

    Returns ``{"miou", "macro_f1", "overall_accuracy", "pixels", "present": [names], "per_class": {name:
    {"iou" (None when absent), "precision", "recall", "f1", "support" (target pixels), "predicted"}}}``.
    mIoU and macro F1 average over the present classes (in target or prediction); with no pixel at all they
    are None.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ConfigError(f"confusion matrix {cm.shape} does not match {k} class names")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    union = support + predicted - tp
    present = union > 0
    iou = _ratio(tp, union)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)
    total = float(cm.sum())
    per_class = {
        str(name): {"iou": float(iou[i]) if present[i] else None, "precision": float(precision[i]),
                    "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i]),
                    "predicted": int(predicted[i])}
        for i, name in enumerate(class_names)}
    return {
        "miou": float(iou[present].mean()) if present.any() else None,
        "macro_f1": float(f1[present].mean()) if present.any() else None,
        "overall_accuracy": float(tp.sum() / total) if total else None,
        "pixels": int(total),
        "present": [str(n) for n, p in zip(class_names, present, strict=True) if p],
        "per_class": per_class,
    }
