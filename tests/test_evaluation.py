"""Evaluation of frozen features: weighted k-NN and linear probe, labelled-set loaders, the ``eval`` CLI.

Classifiers are checked against independent implementations (numpy brute force, scikit-learn on the full
features) and on synthetic features whose answer is known; loaders on files written here and on the bundled
EuroSAT subset (``data/eurosat_mini``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from geo_dino.cli import app
from geo_dino.errors import ConfigError, SourceError
from geo_dino.evaluation import probes as ev
from tests.conftest import ROOT

MINI = ROOT / "data" / "eurosat_mini"
TINY = "vit_tiny_patch16_dinov3_test"
runner = CliRunner()


def _features(train, train_labels, test, test_labels, n_classes: int) -> ev.FeatureSet:
    return ev.FeatureSet(torch.as_tensor(train, dtype=torch.float32), torch.as_tensor(train_labels),
                         torch.as_tensor(test, dtype=torch.float32), torch.as_tensor(test_labels),
                         tuple(f"c{i}" for i in range(n_classes)), {"kind": "synthetic"}, {}, {})


def _clusters(rng: np.random.Generator, n_classes: int, per_class: int, dim: int, noise: float):
    centres = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    return centres[y] + noise * rng.normal(size=(len(y), dim)), y


def _knn_reference(train, train_labels, test, n_classes, k, t):
    """Brute-force DINO k-NN votes in float64, one test image at a time."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    votes = np.zeros((len(b), n_classes))
    for i, row in enumerate(b):
        sim = a @ row
        for j in np.argsort(-sim)[:k]:
            votes[i, train_labels[j]] += np.exp(sim[j] / t)
    return votes


# ---------------------------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize(("k", "t"), [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_knn_matches_brute_force(k, t):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(300, 24)), rng.normal(size=(70, 24))
    labels = rng.integers(0, 7, 300)
    ref = _knn_reference(train, labels, test, 7, k, t)
    got = ev.knn_scores(torch.tensor(train), torch.tensor(labels), torch.tensor(test), n_classes=7, k=k,
                        temperature=t)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4)
    assert (ev.rank_classes(got)[:, 0].numpy() == ref.argmax(1)).all()
    chunked = ev.knn_scores(torch.tensor(train), torch.tensor(labels), torch.tensor(test), n_classes=7, k=k,
                            temperature=t, max_chunk_bytes=1)  # one test image per chunk
    torch.testing.assert_close(chunked, got, rtol=1e-5, atol=0)  # matmul blocking differs by rounding only
    assert torch.equal(ev.rank_classes(chunked), ev.rank_classes(got))


def test_knn_clustered_is_perfect_and_shuffled_labels_near_chance():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 10, 100, 32, 0.05)
    is_test = np.arange(len(y)) % 2 == 1
    res = ev.knn_eval(_features(x[~is_test], y[~is_test], x[is_test], y[is_test], 10))
    assert res.top1 == 1.0 and res.top5 == 1.0
    assert all(v == 1.0 for v in res.per_class.values())
    assert np.trace(np.array(res.confusion)) == is_test.sum() == res.n_test
    shuffled = ev.knn_eval(_features(x[~is_test], rng.permutation(y[~is_test]), x[is_test], y[is_test], 10))
    assert shuffled.top1 < 0.2  # chance is 0.1


def test_knn_refuses_bad_parameters():
    x = torch.randn(10, 4)
    y = torch.arange(10) % 2
    with pytest.raises(ConfigError, match="k 11"):
        ev.knn_scores(x, y, x, n_classes=2, k=11)
    with pytest.raises(ConfigError, match="temperature"):
        ev.knn_scores(x, y, x, n_classes=2, k=3, temperature=0)


def test_top5_follows_dino_with_small_k():
    # 6 classes, k = 2: top-5 counts only the first min(5, k) = 2 ranked classes, as DINO's eval_knn
    train = torch.eye(6)
    test = torch.tensor([[1.0, 0.9, 0.0, 0.0, 0.0, 0.0]])
    res = ev.knn_eval(_features(train, torch.arange(6), test, torch.tensor([2]), 6), k=2)
    assert res.top1 == 0.0 and res.top5 == 0.0  # class 2 ranks third (no votes, lowest index first)
    res = ev.knn_eval(_features(train, torch.arange(6), test, torch.tensor([2]), 6), k=6)
    assert res.top1 == 0.0 and res.top5 == 1.0
    res = ev.knn_eval(_features(train, torch.arange(6), test, torch.tensor([1]), 6), k=2)
    assert res.top1 == 0.0 and res.top5 == 1.0


# ---------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 5, 80, 64, 0.5)
    is_test = rng.random(len(y)) < 0.3
    res = ev.linear_eval(_features(x[~is_test], y[~is_test], x[is_test], y[is_test], 5))
    assert res.top1 >= 0.95
    assert res.params["C"] in ev.DEFAULT_C and res.params["n_val"] > 0
    assert res.params["val_accuracy"][str(res.params["C"])] == max(res.params["val_accuracy"].values())
    assert res.top5 == 1.0


def test_linear_probe_chooses_c_on_held_out_data():
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, 3, 80, 16, 0.3)
    keep = (y == 0) | (np.arange(len(y)) % 3 == 0)  # class 0 three times as frequent as the others
    x, y = x[keep], y[keep]
    # a tiny C leaves only the intercepts, which predict the frequent class: ~60 % held-out accuracy
    _, info = ev.linear_probe(x, y, x[:5], n_classes=3, candidates=(1e-7, 1.0))
    assert info["val_accuracy"]["1e-07"] < 0.7 < info["val_accuracy"]["1.0"]
    assert info["C"] == 1.0
    _, info = ev.linear_probe(x, y, x[:5], n_classes=3, candidates=(10.0, 0.1, 1.0))
    assert set(info["val_accuracy"].values()) == {1.0} and info["C"] == 0.1  # a tie goes to the smaller C


def test_linear_probe_more_dimensions_than_images_is_exact():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 4, 15, 400, 3.0)
    # correlated columns: a decaying spectrum
    mix = rng.normal(size=(400, 400)) * np.logspace(0, -3, 400)[:, None]
    x, test = x @ mix, rng.normal(size=(20, 400)) @ mix
    proba, info = ev.linear_probe(x, y, test, n_classes=4, candidates=(0.05,))
    mu, sd = x.mean(0), x.std(0)
    ref = LogisticRegression(C=0.05, max_iter=5000).fit((x - mu) / sd, y).predict_proba((test - mu) / sd)
    np.testing.assert_allclose(proba, ref, atol=2e-3)
    assert "span" in info["classifier"]


def test_linear_probe_refuses_too_few_training_images():
    with pytest.raises(ConfigError, match="too small"):
        ev.linear_probe(np.eye(4), np.array([0, 1, 2, 3]), np.eye(4), n_classes=4)


# ---------------------------------------------------------------------------------------------- loaders


COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _image(path: Path, colour, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*size, 3), np.uint8) + np.array(colour, np.uint8)
    arr[0, 0] = (7, 8, 9)  # not uniform: lets the test see the layout survive
    Image.fromarray(arr).save(path)
    return path


def _write_csv(root: Path, rows, header=("path", "class", "class_index", "split")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return root / "labels.csv"


def _csv_set(root: Path) -> Path:
    rows = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        for j in range(5):
            split = "train" if j < 3 else "test"
            ext = "png" if j % 2 else "jpg"
            _image(root / name / f"{j}.{ext}", colour)
            rows.append((f"{name}/{j}.{ext}", name, 2 - i, split))  # class_index reversed: order from the CSV
    return _write_csv(root, rows)


def test_csv_loader_and_pixels(tmp_path):
    ds = ev.load_labelled(_csv_set(tmp_path / "set"))
    assert ds.classes == ("blue", "green", "red")
    assert len(ds.train) == 9 and len(ds.test) == 6
    assert {im.fmt for im in ds.train} == {"png", "jpeg"}
    red = [im for im in ds.train if im.path.parent.name == "red"]
    assert red and all(im.label == 2 for im in red)
    prep = ev.prepare_images(ds)
    assert tuple(prep.train.shape) == (9, 3, 16, 16) and prep.record["size"] == [16, 16]
    png = next(i for i, im in enumerate(ds.train) if im.fmt == "png" and im.path.parent.name == "red")
    torch.testing.assert_close(prep.train[png, :, 5, 5], torch.tensor([200, 30, 30]) / 255.0)
    torch.testing.assert_close(prep.train[png, :, 0, 0], torch.tensor([7, 8, 9]) / 255.0)
    assert prep.train_labels.tolist() == [im.label for im in ds.train]
    fs = ev.pixel_features(prep)
    bands = fs.train.view(9, 3, -1).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(bands.mean(1), torch.zeros(3), atol=1e-5, rtol=0)  # standardised per band
    torch.testing.assert_close(bands.std(1), torch.ones(3))
    m, sd = prep.train.mean(dim=(0, 2, 3)), prep.train.std(dim=(0, 2, 3))  # test uses the train statistics
    torch.testing.assert_close(fs.test, ((prep.test - m.view(1, 3, 1, 1)) / sd.view(1, 3, 1, 1)).flatten(1))
    assert ev.knn_eval(fs, k=3).top1 == 1.0  # the colours separate the classes


def test_folder_loader_with_split_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for name, colour in COLOURS.items():
            for j in range(n):
                _image(tmp_path / split / name / f"{j}.png", colour)
    (tmp_path / "README.md").write_text("ignored")
    ds = ev.load_labelled(tmp_path)
    assert ds.classes == ("blue", "green", "red")
    assert len(ds.train) == 9 and len(ds.test) == 6
    assert all(im.path.parts[-3] == im.split for im in ds.train + ds.test)
    assert all(ds.classes[im.label] == im.path.parent.name for im in ds.train + ds.test)


def test_folder_loader_seeded_stratified_split(tmp_path):
    for name, colour in COLOURS.items():
        for j in range(10):
            _image(tmp_path / name / f"{j}.png", colour)
    a = ev.load_labelled(tmp_path, test_fraction=0.3, seed=0)
    b = ev.load_labelled(tmp_path, test_fraction=0.3, seed=0)
    c = ev.load_labelled(tmp_path, test_fraction=0.3, seed=1)
    assert a.test == b.test and a.train == b.train
    assert {im.path for im in a.test} != {im.path for im in c.test}
    for label in range(3):
        assert sum(im.label == label for im in a.test) == 3
        assert sum(im.label == label for im in a.train) == 7
    assert {im.path for im in a.train} | {im.path for im in a.test} == set(tmp_path.glob("*/*.png"))
    assert not {im.path for im in a.train} & {im.path for im in a.test}


def test_geotiff_band_selection_and_scaling(tmp_path):
    import rasterio
    from affine import Affine

    data = np.arange(5 * 8 * 8, dtype=np.uint16).reshape(5, 8, 8) * 3
    rows = []
    for i in range(4):
        p = tmp_path / "set" / f"c{i % 2}" / f"{i}.tif"
        p.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(p, "w", driver="GTiff", width=8, height=8, count=5, dtype="uint16",
                           crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5000000)) as dst:
            dst.write(data + i)
        rows.append((f"c{i % 2}/{i}.tif", f"c{i % 2}", i % 2, "train" if i < 2 else "test"))
    ds = ev.load_labelled(_write_csv(tmp_path / "set", rows))
    prep = ev.prepare_images(ds, bands=(3, 2, 1), value_range=(0.0, 1000.0))
    expected = np.clip((data[[2, 1, 0]].astype(np.float32) + 1) / 1000.0, 0, 1)
    np.testing.assert_allclose(prep.train[1].numpy(), expected, rtol=1e-6)
    with pytest.raises(ConfigError, match="value_range"):
        ev.prepare_images(ds, bands=(1, 2, 3))
    with pytest.raises(ConfigError, match="bands"):
        ev.prepare_images(ds, bands=(6,), value_range=(0.0, 1000.0))


def test_sizes(tmp_path):
    ds = ev.load_labelled(_csv_set(tmp_path / "set"))
    assert ev.prepare_images(ds, patch_size=14).record["size"] == [28, 28]  # 16 rounded up to 14s
    assert tuple(ev.prepare_images(ds, size=8).train.shape[-2:]) == (8, 8)
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        ev.prepare_images(ds, size=20, patch_size=16)


# ---------------------------------------------------------------------------------------------- refusals


def _one_good(root: Path) -> list[tuple]:
    _image(root / "a" / "0.png", COLOURS["red"])
    _image(root / "a" / "1.png", COLOURS["red"])
    return [("a/0.png", "a", 0, "train"), ("a/1.png", "a", 0, "test")]


def test_csv_refusals(tmp_path):
    outside = _image(tmp_path / "outside.png", COLOURS["red"])
    cases = {
        "missing": ([("a/404.png", "a", 0, "train")], SourceError, "not found"),
        "escape": ([("../outside.png", "a", 0, "train")], SourceError, "leaves the dataset root"),
        "absolute": ([(str(outside), "a", 0, "train")], SourceError, "absolute"),
        "symlink": ([("a/link.png", "a", 0, "train")], SourceError, "outside the dataset root"),
        "url": ([("https://example.com/x.png", "a", 0, "train")], SourceError, "URLs"),
        "not-image": ([("a/notes.txt", "a", 0, "train")], SourceError, "not a JPEG, PNG or TIFF"),
        "split": ([("a/0.png", "a", 0, "val")], ConfigError, "split 'val'"),
        "twice": ([("a/0.png", "a", 0, "train")], ConfigError, "listed twice"),
        "index": ([("b/0.png", "b", 0, "train")], ConfigError, "class_index"),
        "only-test": ([("b/0.png", "b", 1, "test")], ConfigError,
                      r"\['b'\] have test images but no training"),
    }
    for name, (extra, error, message) in cases.items():
        root = tmp_path / name
        rows = _one_good(root) + extra
        _image(root / "b" / "0.png", COLOURS["blue"])
        (root / "a" / "notes.txt").write_text("not an image")
        (root / "a" / "link.png").symlink_to(outside)
        with pytest.raises(error, match=message):
            ev.load_labelled(_write_csv(root, rows))


def test_csv_structure_refusals(tmp_path):
    root = tmp_path / "s"
    rows = _one_good(root)
    with pytest.raises(ConfigError, match="unknown"):
        ev.load_labelled(_write_csv(root, [(*r, "x") for r in rows], ("path", "class", "class_index", "split",
                                                                      "extra")))
    with pytest.raises(ConfigError, match="test split is empty"):
        ev.load_labelled(_write_csv(root, rows[:1]))
    with pytest.raises(ConfigError, match="train split is empty"):
        ev.load_labelled(_write_csv(root, rows[1:]))
    with pytest.raises(ConfigError, match="no rows"):
        ev.load_labelled(_write_csv(root, []))
    (root / "labels.txt").write_text("x")
    with pytest.raises(ConfigError, match="neither a .csv"):
        ev.load_labelled(root / "labels.txt")
    with pytest.raises(SourceError, match="not found"):
        ev.load_labelled(root / "nothing.csv")
    assert len(ev.load_labelled(_write_csv(root, [r[:2] + r[3:] for r in rows],
                                           ("path", "class", "split"))).train)


def test_limits_and_folder_refusals(tmp_path):
    root = tmp_path / "s"
    csv_path = _write_csv(root, _one_good(root))
    with pytest.raises(SourceError, match="pixels"):
        ev.prepare_images(ev.load_labelled(csv_path), limits=ev.ImageLimits(max_pixels=100))
    with pytest.raises(SourceError, match="larger than"):
        ev.load_labelled(csv_path, limits=ev.ImageLimits(max_file_bytes=10))
    (root / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(SourceError, match="not a JPEG"):
        ev.load_labelled(root)
    half = tmp_path / "half"
    _image(half / "train" / "a" / "0.png", COLOURS["red"])
    with pytest.raises(ConfigError, match="not test/"):
        ev.load_labelled(half)
    nested = tmp_path / "nested"
    _image(nested / "a" / "deeper" / "0.png", COLOURS["red"])
    with pytest.raises(ConfigError, match="inside a class folder"):
        ev.load_labelled(nested)
    extra = tmp_path / "extra"
    for split, cls in (("train", "a"), ("test", "a"), ("test", "b")):
        _image(extra / split / cls / "0.png", COLOURS["red"])
    with pytest.raises(ConfigError, match=r"\['b'\] have test images"):
        ev.load_labelled(extra)
    link = tmp_path / "linked"
    _image(link / "a" / "0.png", COLOURS["red"])
    (link / "a" / "1.png").symlink_to(_image(tmp_path / "outside.png", COLOURS["red"]))
    with pytest.raises(SourceError, match="outside the dataset root"):
        ev.load_labelled(link)


# ---------------------------------------------------------------------------------------------- bundled data


def test_eurosat_mini_is_intact_and_loads():
    for line in (MINI / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((MINI / name).read_bytes()).hexdigest() == digest, name
    ds = ev.load_labelled(MINI / "labels.csv")
    assert len(ds.classes) == 10 and len(ds.train) == 120 and len(ds.test) == 60
    for label in range(10):
        assert sum(im.label == label for im in ds.train) == 12
        assert sum(im.label == label for im in ds.test) == 6
    folder = ev.load_labelled(MINI, test_fraction=1 / 3)
    assert folder.classes == ds.classes
    assert {im.path for im in folder.train + folder.test} == {im.path for im in ds.train + ds.test}


@pytest.fixture(scope="module")
def tiny():
    from geo_dino.models.backbone import build_backbone

    return build_backbone(TINY)


@pytest.fixture(scope="module")
def mini_prepared():
    return ev.prepare_images(ev.load_labelled(MINI / "labels.csv"), patch_size=16)


def test_model_features_pools_and_mode(tiny, mini_prepared):
    model, spec = tiny
    model.train()
    cls = ev.model_features(model, spec, mini_prepared, pool="cls")
    assert model.training  # restored
    both = ev.model_features(model, spec, mini_prepared, pool="cls+mean")
    mean = ev.model_features(model, spec, mini_prepared, pool="mean")
    assert cls.train.shape == (120, 48) and mean.test.shape == (60, 48) and both.train.shape == (120, 96)
    torch.testing.assert_close(both.train[:, :48], cls.train)
    torch.testing.assert_close(both.test[:, 48:], mean.test)
    assert not torch.allclose(cls.train, mean.train)
    from geo_dino.models.backbone import (
        extract,  # the reference: the feature interface itself, on normalised pixels
    )

    x = ((mini_prepared.test[:4] - torch.tensor(spec.mean).view(1, 3, 1, 1))
         / torch.tensor(spec.std).view(1, 3, 1, 1))
    f = extract(model.eval(), x)
    torch.testing.assert_close(cls.test[:4], f.global_)
    torch.testing.assert_close(mean.test[:4], f.dense.mean(dim=(2, 3)))
    with pytest.raises(ConfigError, match="pool"):
        ev.model_features(model, spec, mini_prepared, pool="max")
    with pytest.raises(ConfigError, match="prepared at"):
        ev.model_features(model, spec, mini_prepared, size=32)
    grey = mini_prepared.train[:, :1]
    with pytest.raises(ConfigError, match="bands"):
        ev.embed(model, spec, grey)


def test_evaluate_model_matches_backbone_route(tiny, mini_prepared):
    model, spec = tiny
    res = ev.evaluate_model(model, spec, mini_prepared, method="knn", extra={"step": 7})
    again = ev.knn_eval(ev.backbone_features(MINI / "labels.csv", arch=TINY))
    assert res.top1 == again.top1 and res.confusion == again.confusion
    assert res.extra == {"step": 7} and res.features["source"] == "random-init"
    assert 0.0 <= res.top1 <= 1.0 and sum(map(sum, res.confusion)) == 60


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_raw_pixels_knn(tmp_path):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "knn", str(MINI / "labels.csv"), "--raw-pixels", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "top-1" in res.output and str(out) in res.output
    rec = json.loads(out.read_text())
    assert rec["method"] == "knn" and rec["params"]["k"] == 20 and rec["params"]["temperature"] == 0.07
    assert rec["n_train"] == 120 and rec["n_test"] == 60 and rec["data"]["size"] == [64, 64]
    assert rec["features"]["kind"] == "raw-pixels" and rec["features"]["dim"] == 3 * 64 * 64
    assert sum(map(sum, rec["confusion"])) == 60 and len(rec["per_class"]) == 10
    assert rec["top1"] > 0.2  # 10 classes: chance is 0.1
    assert rec["top5"] >= rec["top1"]
    assert rec["software"]["torch"] and "git" in rec


def test_cli_tiny_backbone_linear(tmp_path):
    out = tmp_path / "l.json"
    res = runner.invoke(app, ["eval", "linear", str(MINI / "labels.csv"), "--arch", TINY, "--pool",
                              "cls+mean", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert rec["method"] == "linear" and rec["params"]["C"] in rec["params"]["candidates"]
    assert rec["features"]["arch"] == TINY and rec["features"]["source"] == "random-init"
    assert rec["features"]["pool"] == "cls+mean" and rec["features"]["dim"] == 96
    assert rec["data"]["csv_sha256"] == hashlib.sha256((MINI / "labels.csv").read_bytes()).hexdigest()
    assert sum(rec["confusion"][i][i] for i in range(10)) == round(rec["top1"] * 60)


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "knn", "no/such/labels.csv", "--raw-pixels"], "not found"),
    (["eval", "knn", str(MINI / "labels.csv")], "--arch ARCH"),
    (["eval", "knn", str(MINI / "labels.csv"), "--arch", TINY, "--raw-pixels"], "one of them"),
    (["eval", "knn", str(MINI / "labels.csv"), "--arch", "nope"], "unknown architecture"),
    (["eval", "knn", str(MINI / "labels.csv"), "--arch", TINY, "--pool", "max"], "pool"),
    (["eval", "knn", str(MINI / "labels.csv"), "--arch", TINY, "--size", "40"], "multiple of the patch size"),
    (["eval", "linear", str(MINI / "labels.csv"), "--raw-pixels", "--bands", "1,x"], "comma-separated"),
    (["eval", "knn", str(MINI / "labels.csv"), "--raw-pixels", "--k", "500"], "k 500"),
])
def test_cli_errors_are_clear(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
