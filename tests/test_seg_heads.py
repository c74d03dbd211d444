"""Segmentation metrics (against scikit-learn) and the supervised linear head: training on features of the
shipped tiny backbone, early stopping, class weights, determinism, and the head file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from geo_dino.errors import CheckpointError, ConfigError, LabelError
from geo_dino.evaluation.metrics import confusion_matrix, segmentation_metrics, values_to_indices
from geo_dino.inputs.labels import IGNORE, ClassTable, label_stats, spatial_split
from geo_dino.models.backbone import build_backbone
from geo_dino.models.seg_heads import LinearHead, load_head, predict_values, save_head, tile_features
from geo_dino.training.fit_head import TrainResult, evaluate_head, train_linear_head

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models" / "vit_tiny_patch8_geo.safetensors"
TABLE = ClassTable.from_mapping({"bright": 0, "dark": 1, "textured": 2})


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_match_scikit_learn_with_ignored_pixels() -> None:
    rng = np.random.default_rng(1)
    k = 5
    target = rng.integers(0, k - 1, 4000).astype(np.uint8)  # class 4 never labelled ...
    # ... but predicted
    pred = np.where(rng.random(4000) < 0.6, target, rng.integers(0, k, 4000)).astype(np.uint8)
    target[rng.random(4000) < 0.2] = IGNORE
    pred[target == IGNORE] = rng.integers(0, k, int((target == IGNORE).sum()))
    cm = confusion_matrix(pred, target, k)
    keep = target != IGNORE
    t, p = target[keep], pred[keep]
    np.testing.assert_array_equal(cm, sk_confusion(t, p, labels=list(range(k))))
    m = segmentation_metrics(cm, [f"c{i}" for i in range(k)])
    labels = sorted(set(t.tolist()) | set(p.tolist()))
    assert labels == list(range(k))
    iou = jaccard_score(t, p, labels=labels, average=None)
    assert m["miou"] == pytest.approx(float(iou.mean()), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"), abs=1e-12)
    assert m["overall_accuracy"] == pytest.approx(float((t == p).mean()), abs=1e-12)
    prec = precision_score(t, p, labels=list(range(k)), average=None, zero_division=0)
    rec = recall_score(t, p, labels=list(range(k)), average=None, zero_division=0)
    f1 = f1_score(t, p, labels=list(range(k)), average=None, zero_division=0)
    for i in range(k):
        c = m["per_class"][f"c{i}"]
        assert c["iou"] == pytest.approx(iou[i], abs=1e-12)
        assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((prec[i], rec[i], f1[i]), abs=1e-12)
    assert m["per_class"]["c4"]["support"] == 0 and m["per_class"]["c4"]["recall"] == 0.0
    assert m["pixels"] == int(keep.sum())
    json.dumps(m, allow_nan=False)


def test_absent_class_is_left_out_of_the_mean_and_perfect_prediction_scores_one() -> None:
    target = np.array([[0, 0, 1], [1, IGNORE, IGNORE]], np.uint8)
    pred = np.array([[0, 0, 1], [1, 2, 0]], np.uint8)  # wrong only where ignored
    m = segmentation_metrics(confusion_matrix(pred, target, 3), ["a", "b", "c"])
    assert m["miou"] == 1.0 and m["macro_f1"] == 1.0 and m["overall_accuracy"] == 1.0
    assert m["present"] == ["a", "b"] and m["per_class"]["c"]["iou"] is None
    assert m["pixels"] == 4
    empty = segmentation_metrics(confusion_matrix(pred, np.full_like(target, IGNORE), 3), ["a", "b", "c"])
    assert empty["miou"] is None and empty["pixels"] == 0


def test_metric_input_errors() -> None:
    with pytest.raises(ConfigError, match="outside"):
        confusion_matrix(np.array([3]), np.array([0]), 3)
    with pytest.raises(ConfigError, match="shape"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)
    np.testing.assert_array_equal(values_to_indices(np.array([7, 3, 255, 0], np.uint8), (0, 3, 7)),
                                  [2, 1, 255, 0])
    with pytest.raises(LabelError, match=r"\[5\]"):
        values_to_indices(np.array([5], np.uint8), (0, 3, 7))


# ---------------------------------------------------------------------------------------- a learnable problem


def _scene(seed: int, n: int = 8, tile: int = 32, cell: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """An ``n × n`` grid of ``tile``-pixel tiles; each ``cell``-pixel square is bright, dark or a 2-pixel
    checkerboard (classes 0, 1, 2), with noise; 10 % of label pixels IGNORE. Returns tiles ``(n², 3, t, t)``
    in [0, 1] and labels ``(n², t, t)``, tile ``(r, c)`` at index ``r * n + c``."""
    rng = np.random.default_rng(seed)
    size = n * tile
    cls = np.kron(rng.integers(0, 3, (size // cell, size // cell)), np.ones((cell, cell), int))
    yy, xx = np.mgrid[0:size, 0:size]
    checker = ((yy // 2 + xx // 2) % 2).astype(np.float32)
    img = np.where(cls == 0, 0.85, np.where(cls == 1, 0.15, 0.2 + 0.6 * checker)).astype(np.float32)
    img = np.clip(img[None] + rng.normal(0, 0.05, (3, size, size)), 0, 1).astype(np.float32)
    lab = cls.astype(np.uint8)
    lab[rng.random(lab.shape) < 0.1] = IGNORE
    tiles = img.reshape(3, n, tile, n, tile).transpose(1, 3, 0, 2, 4).reshape(n * n, 3, tile, tile)
    labels = lab.reshape(n, tile, n, tile).transpose(0, 2, 1, 3).reshape(n * n, tile, tile)
    return tiles, labels


@pytest.fixture(scope="module")
def learnable() -> dict:
    model, spec = build_backbone("vit_tiny_patch8_geo", checkpoint=CKPT)
    tiles, labels = _scene(0)
    feats = tile_features(model, spec, tiles, batch_size=16)
    train, val, _ = spatial_split([(r, c) for r in range(8) for c in range(8)], 0.25, block=2, buffer=1,
                                  seed=0)
    ti, vi = [r * 8 + c for r, c in train], [r * 8 + c for r, c in val]
    return {"model": model, "spec": spec, "tiles": tiles, "feats": feats, "labels": labels, "ti": ti,
            "vi": vi}


def test_tile_features_are_the_normalised_dense_features(learnable: dict) -> None:
    from geo_dino.models.backbone import extract

    f, spec = learnable["feats"], learnable["spec"]
    assert tuple(f.shape) == (64, spec.embed_dim, 4, 4) and f.dtype == torch.float32 and not f.is_inference()
    x = torch.from_numpy(learnable["tiles"][:2])
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(f[:2], extract(learnable["model"], (x - mean) / std).dense)
    assert not torch.allclose(f[:2], extract(learnable["model"], x).dense)  # normalisation matters
    with pytest.raises(ConfigError, match="bands"):
        tile_features(learnable["model"], spec, learnable["tiles"][:1, :2])


def test_linear_head_learns_and_early_stopping_keeps_the_best_epoch(learnable: dict) -> None:
    f, y, ti, vi = learnable["feats"], learnable["labels"], learnable["ti"], learnable["vi"]
    # Majority-class baseline: the most common training class predicted everywhere on validation.
    counts = label_stats(y[ti], TABLE)["counts"]
    majority = TABLE.values[TABLE.names.index(max(counts, key=counts.get))]
    base = segmentation_metrics(confusion_matrix(np.full(y[vi].shape, majority, np.uint8), y[vi], 3),
                                TABLE.names)
    res = train_linear_head(f[ti], y[ti], f[vi], y[vi], TABLE, epochs=60, lr=1.0, patience=5, batch_size=4,
                            seed=0)
    assert res.metrics["miou"] > base["miou"] + 0.5 and res.metrics["miou"] > 0.9
    mious = [h["val_miou"] for h in res.history]
    assert [h["epoch"] for h in res.history] == list(range(len(mious)))
    assert res.best_epoch == int(np.argmax(mious))  # the first best
    assert len(mious) == res.best_epoch + 5 + 1 < 60  # stopped `patience` epochs after the best
    assert mious[-1] < mious[res.best_epoch]  # the last epoch was worse: keeping the best matters here
    again = evaluate_head(res.head, f[vi], y[vi], TABLE)
    assert again["miou"] == mious[res.best_epoch] == res.metrics["miou"]


def test_training_is_deterministic_with_the_seed(learnable: dict) -> None:
    f, y, ti, vi = learnable["feats"], learnable["labels"], learnable["ti"], learnable["vi"]
    kw = {"epochs": 3, "lr": 1e-2, "patience": 5, "batch_size": 4}
    a = train_linear_head(f[ti], y[ti], f[vi], y[vi], TABLE, seed=3, **kw)
    b = train_linear_head(f[ti], y[ti], f[vi], y[vi], TABLE, seed=3, **kw)
    c = train_linear_head(f[ti], y[ti], f[vi], y[vi], TABLE, seed=4, **kw)
    assert a.history == b.history and a.best_epoch == b.best_epoch
    for k, v in a.head.state_dict().items():
        assert torch.equal(v, b.head.state_dict()[k])
    assert not torch.equal(a.head.conv.weight, c.head.conv.weight)  # the seed orders the mini-batches


def test_class_weights_raise_rare_class_recall() -> None:
    rng = np.random.default_rng(5)

    def data(n: int) -> tuple[torch.Tensor, np.ndarray]:
        patch = (rng.random((n, 4, 4)) < 0.06).astype(np.uint8)  # class 1 ("rare") on ~6 % of patches
        x = rng.normal(0, 1, (n, 8, 4, 4)).astype(np.float32)
        x[:, 0] += 1.2 * patch  # overlapping classes: the decision threshold follows the class balance
        return torch.from_numpy(x), np.kron(patch, np.ones((1, 4, 4), np.uint8))

    (xt, yt), (xv, yv) = data(60), data(60)
    table = ClassTable.from_mapping({"common": 0, "rare": 1})
    weights = label_stats(yt, table)["weight_vector"]
    assert weights[1] > 5 * weights[0]
    kw = {"epochs": 30, "lr": 5e-2, "patience": 30, "batch_size": 8, "seed": 0}
    plain = train_linear_head(xt, yt, xv, yv, table, **kw)
    weighted = train_linear_head(xt, yt, xv, yv, table, class_weights=weights, **kw)
    r_plain = plain.metrics["per_class"]["rare"]["recall"]
    r_weighted = weighted.metrics["per_class"]["rare"]["recall"]
    assert r_weighted > r_plain + 0.2, (r_plain, r_weighted)
    by_name = train_linear_head(xt, yt, xv, yv, table, class_weights=label_stats(yt, table)["weights"], **kw)
    assert torch.equal(by_name.head.conv.weight, weighted.head.conv.weight)
    with pytest.raises(ConfigError, match="class_weights"):
        train_linear_head(xt, yt, xv, yv, table, class_weights=[1.0], **kw)


def test_ignored_pixels_do_not_train_the_head() -> None:
    """Tiles labelled only IGNORE added to a full batch leave the head unchanged; labelled, they change it."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(0, 1, (6, 8, 2, 2)).astype(np.float32))
    y = rng.integers(0, 2, (6, 8, 8)).astype(np.uint8)
    y[:, :4] = IGNORE
    extra = torch.from_numpy(rng.normal(3, 1, (3, 8, 2, 2)).astype(np.float32))
    table = ClassTable.from_mapping({"a": 0, "b": 1})
    kw = {"epochs": 3, "lr": 1e-2, "batch_size": 16, "seed": 0}
    a = train_linear_head(x, y, x, y, table, **kw)
    ignored = np.full((3, 8, 8), IGNORE, np.uint8)
    b = train_linear_head(torch.cat([x, extra]), np.concatenate([y, ignored]), x, y, table, **kw)
    c = train_linear_head(torch.cat([x, extra]), np.concatenate([y, ignored * 0]), x, y, table, **kw)
    torch.testing.assert_close(a.head.conv.weight, b.head.conv.weight, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.head.conv.weight, c.head.conv.weight, rtol=1e-3, atol=1e-4)
    assert a.metrics["pixels"] == int((y != IGNORE).sum())
    with pytest.raises(LabelError):
        train_linear_head(x, np.where(y == IGNORE, 7, y).astype(np.uint8), x, y, table, **kw)
    with pytest.raises(ConfigError, match="all IGNORE"):
        train_linear_head(x, np.full_like(y, IGNORE), x, y, table, **kw)


# --------------------------------------------------------------------------------------------- head files


def _trained(learnable: dict) -> TrainResult:
    f, y, ti, vi = learnable["feats"], learnable["labels"], learnable["ti"], learnable["vi"]
    return train_linear_head(f[ti], y[ti], f[vi], y[vi], TABLE, epochs=3, lr=1e-1, batch_size=8)


def test_save_and_load_round_trip(learnable: dict, tmp_path: Path) -> None:
    res = _trained(learnable)
    spec = learnable["spec"]
    pre = {"scale": "uint8", "mean": list(spec.mean), "std": list(spec.std)}
    path = save_head(tmp_path / "head.safetensors", res.head, TABLE, backbone_spec=spec, preprocessing=pre,
                     metrics=res.metrics)
    head, table, meta = load_head(path)
    assert table == TABLE
    f = learnable["feats"][:4]
    assert torch.equal(head(f, (32, 32)), res.head(f, (32, 32)))
    assert meta["backbone"]["arch"] == "vit_tiny_patch8_geo" and meta["backbone"]["sha256"] == spec.sha256
    assert meta["backbone"]["mean"] == list(spec.mean)
    assert meta["preprocessing"] == pre and meta["metrics"] == res.metrics
    np.testing.assert_array_equal(predict_values(head, f, (32, 32), table.values),
                                  predict_values(res.head, f, (32, 32), TABLE.values))


def test_linear_head_upsampling_equals_classifying_upsampled_features() -> None:
    torch.manual_seed(0)
    head = LinearHead(6, 3)
    torch.nn.init.normal_(head.conv.weight)
    torch.nn.init.normal_(head.conv.bias)
    f = torch.randn(2, 6, 3, 5)
    up = torch.nn.functional.interpolate(f, size=(12, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(f, (12, 20)), head(up))


def test_load_refuses_bad_files(learnable: dict, tmp_path: Path) -> None:
    res = _trained(learnable)
    good = save_head(tmp_path / "good.safetensors", res.head, TABLE, backbone_spec=learnable["spec"],
                     preprocessing={}, metrics=None)
    tensors = {k: v.detach().clone() for k, v in res.head.state_dict().items()}
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as fh:
        meta = dict(fh.metadata())

    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(CheckpointError, match="metadata"):
        load_head(bare)

    four = ClassTable.from_mapping({"a": 0, "b": 1, "c": 2, "d": 3})
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong),
              metadata={**meta, "class_table": json.dumps(four.to_dict()), "n_classes": "4"})
    with pytest.raises(CheckpointError, match="4 classes"):
        load_head(wrong)

    pickled = tmp_path / "pickled.safetensors"
    torch.save(tensors, pickled)
    with pytest.raises(CheckpointError, match="refused"):
        load_head(pickled)
    with pytest.raises(CheckpointError, match="not found"):
        load_head(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="classes"):
        save_head(tmp_path / "x.safetensors", res.head, four, backbone_spec=learnable["spec"],
                  preprocessing={}, metrics=None)


def test_siamese_features_shapes_symmetry_and_errors() -> None:
    from geo_dino.errors import ConfigError
    from geo_dino.models.seg_heads import siamese_features

    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    d = siamese_features(f1, f2, "diff")
    assert d.shape == (2, 4, 3, 3) and torch.equal(d, siamese_features(f2, f1, "diff"))  # order-free
    assert float(siamese_features(f1, f1, "diff").abs().max()) == 0.0  # no change, no signal
    c = siamese_features(f1, f2, "concat")
    assert c.shape == (2, 8, 3, 3) and torch.equal(c[:, :4], f1) and torch.equal(c[:, 4:], f2)
    cd = siamese_features(f1, f2)
    assert cd.shape == (2, 12, 3, 3) and torch.equal(cd[:, 8:], d)
    with pytest.raises(ConfigError, match="one grid"):
        siamese_features(f1, f2[:, :, :2])
    with pytest.raises(ConfigError, match="choose one of"):
        siamese_features(f1, f2, "sum")


def test_dpt_head_learns_from_four_layers(learnable: dict) -> None:
    """The multi-layer head reaches what the linear head reaches on the same task, from four blocks'
    features, and keeps the best early-stopping state."""
    from geo_dino.models.backbone import extract
    from geo_dino.models.dpt_head import DPTHead
    from geo_dino.training.fit_head import train_head

    spec, model, y, ti, vi = learnable["spec"], learnable["model"], learnable["labels"], learnable["ti"], \
        learnable["vi"]
    x = torch.from_numpy(learnable["tiles"])
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    layers = (0, 2, 3, 5)
    with torch.inference_mode():
        got = extract(model, (x - mean) / std, layers).layers
    f = torch.cat([got[i] for i in layers], dim=1).clone()  # (64, 4·192, 4, 4), a plain tensor
    counts = label_stats(y[ti], TABLE)["counts"]
    majority = TABLE.values[TABLE.names.index(max(counts, key=counts.get))]
    base = segmentation_metrics(confusion_matrix(np.full(y[vi].shape, majority, np.uint8), y[vi], 3),
                                TABLE.names)
    torch.manual_seed(0)
    head = DPTHead(spec.embed_dim, 3, n_layers=4, hidden=16)
    res = train_head(head, f[ti], y[ti], f[vi], y[vi], TABLE, epochs=40, lr=3e-3, batch_size=8, eval_every=4,
                     patience=6, seed=0)
    assert res.metrics["miou"] > base["miou"] + 0.4 and res.metrics["miou"] > 0.8, res.metrics
    assert evaluate_head(res.head, f[vi], y[vi], TABLE)["miou"] == res.metrics["miou"]  # the kept state
    # one layer's features do not fit a 4-layer head
    with pytest.raises(Exception, match="channels|shape|size"):
        res.head(f[:1, :spec.embed_dim], (32, 32))


BINARY = ClassTable.from_mapping({"no": 0, "yes": 1})


def _spectral_problem(seed: int = 0) -> dict:
    """Labels set by the bands (a linear rule on two of three bands), features that are pure noise."""
    rng = np.random.default_rng(seed)
    spec = torch.from_numpy(rng.normal(size=(24, 3, 16, 16)).astype(np.float32) * 5 + 40)
    lab = ((spec[:, 0] - 40) + 0.5 * (spec[:, 1] - 40) > 0).numpy().astype(np.uint8)
    feats = torch.from_numpy(rng.normal(size=(24, 8, 4, 4)).astype(np.float32))
    return {"spec": spec, "lab": lab, "feats": feats}


@pytest.mark.parametrize("kind", ["linear", "mlp", "dpt"])
def test_a_spectral_head_starts_as_the_logistic_regression_and_keeps_it(kind: str) -> None:
    from sklearn.linear_model import LogisticRegression

    from geo_dino.models.seg_heads import build_head
    from geo_dino.training.fit_head import evaluate_head, init_from_logistic, spectral_stats, train_head

    p = _spectral_problem()
    cfg = {"type": kind, "embed_dim": 8, "n_classes": 2, "spectral": 3}
    if kind == "dpt":
        cfg |= {"n_layers": 1, "hidden": 8}
    torch.manual_seed(0)
    head = build_head(cfg)
    head.set_spectral_stats(*spectral_stats(p["spec"][:16], p["lab"][:16]))
    start = init_from_logistic(head, p["spec"][:16], p["lab"][:16], BINARY)
    assert start["classes"] == [0, 1]
    # before any training the head's decisions are the regression's, pixel for pixel
    x = p["spec"][16:].permute(0, 2, 3, 1).reshape(-1, 3).numpy().astype(np.float64)
    mean, std = head.spec_mean.numpy(), head.spec_std.numpy()
    xs = p["spec"][:16].permute(0, 2, 3, 1).reshape(-1, 3).numpy().astype(np.float64)
    ref = LogisticRegression(class_weight="balanced", max_iter=2000).fit(
        (xs - mean) / std, p["lab"][:16].reshape(-1))
    want = ref.predict((x - mean) / std).reshape(8, 16, 16)
    got = predict_values(head, p["feats"][16:], (16, 16), BINARY.values, spectral=p["spec"][16:])
    assert (got == want).mean() > 0.999
    assert (got == p["lab"][16:]).mean() > 0.97
    miou0 = evaluate_head(head, p["feats"][16:], p["lab"][16:], BINARY, spectral=p["spec"][16:])["miou"]
    # training on noise features cannot make it worse on the early-stopping pixels: the start competes
    res = train_head(head, p["feats"][:16], p["lab"][:16], p["feats"][16:], p["lab"][16:], BINARY, epochs=5,
                     lr=1e-2, batch_size=4, patience=3, eval_every=2, train_spectral=p["spec"][:16],
                     val_spectral=p["spec"][16:])
    assert res.history[0]["step"] == 0 and res.history[0]["epoch"] == -1
    assert res.history[0]["val_miou"] == pytest.approx(miou0)
    assert res.metrics["miou"] >= miou0 - 1e-12 and len(res.history) > 1


def test_spectral_heads_check_their_input_and_round_trip(tmp_path: Path) -> None:
    from geo_dino.models.seg_heads import MLPHead, spectral_input

    p = _spectral_problem()
    head = MLPHead(8, 2, spectral=3, hidden=6)
    head.set_spectral_stats([40, 40, 40], [5, 5, 5])
    with pytest.raises(ConfigError, match="spectral channels per pixel"):
        head(p["feats"][:2], (16, 16))
    with pytest.raises(ConfigError, match="spectral input"):
        head(p["feats"][:2], (16, 16), spectral=p["spec"][:2, :2])
    with pytest.raises(ConfigError, match="takes none"):
        predict_values(LinearHead(8, 2), p["feats"][:2], (16, 16), BINARY.values, spectral=p["spec"][:2])
    x1, x2 = p["spec"][:2], p["spec"][2:4]
    both = spectral_input(x1, x2)
    assert both.shape == (2, 9, 16, 16) and torch.equal(both[:, 6:], (x2 - x1).abs())
    spec = {"arch": "vit_tiny_patch16_dinov3_test", "source": "random-init", "embed_dim": 8}
    path = save_head(tmp_path / "h.safetensors", head, BINARY, backbone_spec=spec, preprocessing={},
                     metrics=None)
    back, _, meta = load_head(path)
    assert meta["head"] == {"type": "mlp", "embed_dim": 8, "n_classes": 2, "spectral": 3, "hidden": 6}
    assert torch.equal(back.spec_mean, head.spec_mean)
    with torch.inference_mode():
        assert torch.equal(back(p["feats"][:2], (16, 16), spectral=x1), head(p["feats"][:2], (16, 16),
                                                                           spectral=x1))
