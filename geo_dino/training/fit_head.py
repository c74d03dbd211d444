"""Fitting a supervised head: the per-pixel logistic start, early stopping on held-out tiles, metrics.

The heads themselves (architectures, their input conventions, the head file) are
:mod:`geo_dino.models.seg_heads`; this module trains them. :func:`train_head` runs AdamW on cross-entropy with
the ignore index, measures macro F1 on the early-stopping tiles every ``eval_every`` epochs (and once before
training, so a head whose start is best keeps it), and returns the best head; :func:`evaluate_head` scores a
head on held-out tiles (:mod:`geo_dino.evaluation.metrics`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from geo_dino.errors import ConfigError
from geo_dino.evaluation.metrics import confusion_matrix, segmentation_metrics, values_to_indices
from geo_dino.inputs.labels import IGNORE
from geo_dino.models.seg_heads import LinearHead, call_head, predict_values
from geo_dino.models.spectral_input import SpectralInput

if TYPE_CHECKING:
    from geo_dino.inputs.labels import ClassTable

Array = Tensor | np.ndarray  # a tensor, or an array turned into one


def init_from_logistic(head: SpectralInput, spectral: Array, labels: Array, table: ClassTable, *,
                       max_pixels: int = 60_000,
                       seed: int = 0) -> dict[str, Any]:
    """Start a spectral head as the per-pixel logistic regression on its (standardised) bands.

    A multinomial logistic regression (scikit-learn, balanced class weights) is fitted on up to
    ``max_pixels`` labelled pixels of ``spectral (N, S, H, W)`` / ``labels (N, H, W)``, standardised with the
    head's own statistics, and written into the head's linear spectral path (the feature part and the MLP /
    DPT part start at zero output): before training the head *is* that regression, so training with early
    stopping — whose first measurement is this starting point — keeps it unless the features improve on it.
    Returns what was fitted (pixels, iterations)."""
    from sklearn.linear_model import LogisticRegression

    x = spectral.numpy() if torch.is_tensor(spectral) else np.asarray(spectral, np.float32)
    y = np.asarray(labels)
    flat = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    yy = values_to_indices(y.reshape(-1), table.values)
    keep = np.nonzero(yy != IGNORE)[0]
    if keep.size == 0:
        raise ConfigError("no labelled pixel to fit the spectral start of the head on")
    rng = np.random.default_rng(seed)
    if keep.size > max_pixels:
        keep = rng.choice(keep, max_pixels, replace=False)
    mean = head.spec_mean.numpy().astype(np.float64)
    std = head.spec_std.numpy().astype(np.float64)
    xs = (flat[keep].astype(np.float64) - mean) / std
    present = np.unique(yy[keep])
    if present.size < 2:
        raise ConfigError("the training pixels hold one class only: nothing to separate")
    clf = LogisticRegression(class_weight="balanced", max_iter=2000).fit(xs, yy[keep])
    k = len(table.values)
    w = np.zeros((k, x.shape[1]))
    b = np.full(k, -30.0)  # a class absent from the training pixels is never predicted at the start
    if clf.coef_.shape[0] == 1:  # binary: sklearn keeps one row, logit(class 1) - logit(class 0)
        c0, c1 = (int(c) for c in clf.classes_)
        w[c1], b[c1], b[c0] = clf.coef_[0], clf.intercept_[0], 0.0
    else:
        for row, c in enumerate(clf.classes_):
            w[int(c)], b[int(c)] = clf.coef_[row], clf.intercept_[row]
    weight, bias = head.linear_spectral()
    if bias is None:  # every head's spectral path has a bias; a new head type must too
        raise ConfigError(f"{type(head).__name__}: its linear spectral path has no bias to start from")
    with torch.no_grad():
        weight.copy_(torch.as_tensor(w, dtype=weight.dtype).view_as(weight))
        bias.copy_(torch.as_tensor(b, dtype=bias.dtype))
    return {"pixels": int(keep.size), "iterations": int(np.max(clf.n_iter_)),
            "classes": [int(c) for c in present]}


def spectral_stats(spectral: Array, labels: Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of spectral input ``(N, S, H, W)`` over its pixels (those
    with a label when ``labels`` ``(N, H, W)`` is given)."""
    x = spectral.numpy() if torch.is_tensor(spectral) else np.asarray(spectral, np.float32)
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    if labels is not None:
        keep = (np.asarray(labels) != IGNORE).reshape(-1)
        if keep.any():
            flat = flat[:, keep]
    return flat.mean(1).astype(np.float32), flat.std(1).astype(np.float32)


# --------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class TrainResult:
    """The best head (by validation mIoU), its 0-based ``best_epoch``, one ``history`` entry per epoch run
    (``epoch``, ``train_loss``, ``val_miou``, ``lr``) and the ``metrics`` of the best head on validation."""

    head: SpectralInput
    best_epoch: int
    history: list[dict[str, Any]]
    metrics: dict[str, Any]


def _as_tensor(a: Array, dtype: torch.dtype) -> Tensor:
    return a.to(dtype) if torch.is_tensor(a) else torch.as_tensor(np.asarray(a)).to(dtype)


def _weights(class_weights: Sequence[float] | Mapping[str, float] | None, table: ClassTable) -> Tensor | None:
    if class_weights is None:
        return None
    if isinstance(class_weights, Mapping):
        unknown = sorted(set(class_weights) - set(table.names))
        missing = [n for n in table.names if n not in class_weights]
        if unknown or missing:
            raise ConfigError(f"class_weights: unknown classes {unknown}, missing classes {missing}; "
                              "give one weight per class of the table (labels.label_stats(...)['weights'])")
        class_weights = [class_weights[n] for n in table.names]
    w = [float(v) for v in class_weights]
    if len(w) != len(table.names) or any(not np.isfinite(v) or v < 0 for v in w) or not any(w):
        raise ConfigError(f"class_weights {w} must be {len(table.names)} finite non-negative numbers, "
                          "not all 0 (labels.label_stats(...)['weight_vector'])")
    return torch.tensor(w, dtype=torch.float32)


def evaluate_head(head: SpectralInput, features: Tensor, labels: Array, table: ClassTable,
                  spectral: Tensor | None = None) -> dict[str, Any]:
    """:func:`~geo_dino.evaluation.metrics.segmentation_metrics` of the head on features (and spectral input)
    and
    ``uint8`` label values."""
    lab = np.asarray(labels)
    pred = values_to_indices(predict_values(head, features, lab.shape[-2:], table.values, spectral=spectral),
                             table.values)
    target = values_to_indices(lab, table.values)
    return segmentation_metrics(confusion_matrix(pred, target, len(table.values)), table.names)


def train_linear_head(train_feats: Array, train_labels: Array, val_feats: Array, val_labels: Array,
                      table: ClassTable, *,
                      class_weights: Sequence[float] | Mapping[str, float] | None = None, epochs: int = 50,
                      lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 16, patience: int = 5,
                      seed: int = 0, eval_every: int | None = None) -> TrainResult:
    """:func:`train_head` with a fresh :class:`LinearHead` sized from the features and the table."""
    x = _as_tensor(train_feats, torch.float32)
    # shapes checked in train_head
    head = LinearHead(int(x.shape[1]) if x.ndim == 4 else 1, len(table.values))
    return train_head(head, train_feats, train_labels, val_feats, val_labels, table,
                      class_weights=class_weights, epochs=epochs, lr=lr, weight_decay=weight_decay,
                      batch_size=batch_size, patience=patience, seed=seed, eval_every=eval_every)


def train_head(head: SpectralInput, train_feats: Array, train_labels: Array, val_feats: Array,
               val_labels: Array, table: ClassTable, *,
               class_weights: Sequence[float] | Mapping[str, float] | None = None, epochs: int = 50,
               lr: float = 1e-2, weight_decay: float = 1e-4, batch_size: int = 16, patience: int = 5,
               seed: int = 0, eval_every: int | None = None, train_spectral: Array | None = None,
               val_spectral: Array | None = None) -> TrainResult:
    """Fit ``head`` (a :class:`LinearHead`, :class:`MLPHead` or :class:`~geo_dino.models.dpt_head.DPTHead`) on
    frozen features (and, for a spectral head, ``*_spectral`` pixel bands ``(N, S, H, W)``) with early
    stopping on validation mIoU.

    ``*_feats``: ``float32 (N, C, h, w)``; ``*_labels``: ``uint8 (N, H, W)`` class values of ``table`` or
    :data:`~geo_dino.inputs.labels.IGNORE`. Loss: cross-entropy on logits upsampled to ``(H, W)``, ignore
    index 255,
    optional ``class_weights`` (ordered as the table, or by name; e.g. from
    :func:`geo_dino.inputs.labels.label_stats`). AdamW; mini-batches shuffled by ``seed``.

    The validation mIoU is measured every ``eval_every`` optimiser steps (``None``: after each epoch) and at
    the end; the state with the highest one (first reached) is kept, and training stops after ``patience``
    measurements without improvement — so with ``eval_every`` the patience is ``patience × eval_every``
    steps, whatever the number of tiles (on one small chip an epoch is only a few steps). The same inputs and
    seed give the same head. ``history`` has one entry per measurement (``step``, ``epoch``, ``train_loss``
    since the previous one, ``val_miou``, ``lr``).
    """
    if epochs < 1 or patience < 1 or batch_size < 1 or lr <= 0 or (eval_every is not None and eval_every < 1):
        raise ConfigError(f"epochs {epochs}, patience {patience}, batch_size {batch_size}, lr {lr} "
                          f"and eval_every {eval_every} must be positive")
    xt, xv = _as_tensor(train_feats, torch.float32), _as_tensor(val_feats, torch.float32)
    yt_np, yv_np = np.asarray(train_labels), np.asarray(val_labels)
    for name, x, y in (("train", xt, yt_np), ("val", xv, yv_np)):
        if x.ndim != 4 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ConfigError(f"{name}: features {tuple(x.shape)} and labels {y.shape} "
                              "must be (N, C, h, w) and (N, H, W) with the same N > 0")
    if xt.shape[1] != xv.shape[1]:
        raise ConfigError(f"train and val features have {xt.shape[1]} and {xv.shape[1]} channels")
    if xt.shape[1] != head.in_channels:
        raise ConfigError(f"the features have {xt.shape[1]} channels; the head takes {head.in_channels}")
    st = sv = None
    if getattr(head, "spectral", 0):
        if train_spectral is None or val_spectral is None:
            raise ConfigError(f"the head takes {head.spectral} spectral channels: give train_spectral and "
                              "val_spectral")
        st, sv = _as_tensor(train_spectral, torch.float32), _as_tensor(val_spectral, torch.float32)
        for name, s_, y in (("train", st, yt_np), ("val", sv, yv_np)):
            if s_.ndim != 4 or s_.shape[0] != y.shape[0] or tuple(s_.shape[-2:]) != tuple(y.shape[-2:]):
                raise ConfigError(f"{name}: spectral input {tuple(s_.shape)} must be (N, S, H, W) with the "
                                  f"labels' N, H, W {y.shape}")
    if head.n_classes != len(table.values):
        raise ConfigError(f"the head has {head.n_classes} classes but the table {len(table.values)}")
    yt = torch.as_tensor(values_to_indices(yt_np, table.values).astype(np.int64))
    if not (yt != IGNORE).any():
        raise ConfigError("the training labels are all IGNORE: nothing to learn from")
    weight = _weights(class_weights, table)
    out_size = (int(yt.shape[-2]), int(yt.shape[-1]))

    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # a DPT head's random init; a linear head starts at zero
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"miou": -1.0, "index": -1, "epoch": -1, "state": None, "metrics": None}
    window = {"loss": 0.0, "n": 0}
    step = 0

    def measure(epoch: int) -> bool:  # True: stop (patience spent)
        metrics = evaluate_head(head, xv, yv_np, table, spectral=sv)
        miou = metrics["miou"] if metrics["miou"] is not None else 0.0
        history.append({"step": step, "epoch": epoch, "train_loss": window["loss"] / max(window["n"], 1),
                        "val_miou": miou, "lr": lr})
        window.update(loss=0.0, n=0)
        if miou > best["miou"]:
            best.update(miou=miou, index=len(history) - 1, epoch=epoch, metrics=metrics,
                        state=copy.deepcopy(head.state_dict()))
        head.train()
        return len(history) - 1 - best["index"] >= patience

    if getattr(head, "spectral", 0):
        # a spectral head's start (the logistic regression, init_from_logistic) competes too, as epoch -1:
        # it is kept unless training improves on it
        measure(-1)
    stop = False
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(xt.shape[0], generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yb = yt[idx]
            if not (yb != IGNORE).any():
                continue
            loss = loss_fn(call_head(head, xt[idx], out_size, None if st is None else st[idx]), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            window["loss"] += float(loss.detach()) * len(idx)
            window["n"] += len(idx)
            if eval_every is not None and step % eval_every == 0 and measure(epoch):
                stop = True
                break
        if stop:
            break
        if eval_every is None and measure(epoch):
            break
    if not history or history[-1]["step"] != step:
        measure(epochs - 1 if not stop else history[-1]["epoch"])
    head.load_state_dict(best["state"])
    head.eval()
    return TrainResult(head=head, best_epoch=best["epoch"], history=history, metrics=best["metrics"])


# --------------------------------------------------------------------------------------------- head files


