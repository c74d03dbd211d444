"""DINO pretraining end to end on the bundled rasters: outputs, exact resume, DDP through torchrun (gloo, two
CPU processes), the exported checkpoint in the loader and the pipeline, the flow and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from geo_dino.errors import ConfigError
from geo_dino.training.pretrain import CHECKPOINT, METRICS, load_training_checkpoint, pretrain
from geo_dino.training.pretrain_config import load_pretrain_config, parse_pretrain_config

ROOT = Path(__file__).resolve().parents[1]
BAHAMAS = ROOT / "data/rasters/landsat7_bahamas_RGB.byte.tif"
NAIP = ROOT / "data/rasters/naip/m_4709963_se_14_1_20090818.tif"


def tiny(tmp_path: Path, name: str = "t", **over: object) -> dict:
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "data": {"rasters": [str(BAHAMAS), str(NAIP)], "tile_size": 64,
                 "sources": {"allowed_roots": [str(ROOT)], "bands": [1, 2, 3]}},
        "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
        "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "drop_path_rate": 0.1},
        "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        "recipe": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "koleo_weight": 0.1, "ibot": {},
                   "gram": {"update_every": 2}},
        "log_every": 1,
        "checkpoint_every": 3,
        "threads": 1,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def test_a_run_writes_metrics_checkpoint_backbone_and_model_card(tmp_path: Path) -> None:
    cfg = parse_pretrain_config(tiny(tmp_path))
    res = pretrain(cfg)
    assert res is not None and res.steps == 6
    rows = metrics(res.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        for key in ("loss", "loss_dino", "loss_ibot", "loss_koleo", "loss_gram", "teacher_entropy",
                    "kl_student_teacher", "feature_std", "images_per_s", "lr", "teacher_momentum"):
            assert np.isfinite(r[key]), key
        assert r["loss"] == pytest.approx(sum(r[k] for k in r if k.startswith("loss_")), rel=1e-6)
    # schedules: warm-up then cosine, momentum rising to 1
    assert rows[0]["lr"] < rows[1]["lr"] and rows[-1]["lr"] < rows[2]["lr"]
    assert rows[-1]["teacher_momentum"] > rows[0]["teacher_momentum"]
    # exported backbone: timm layout, the teacher's weights, metadata the loader reads
    tensors = load_file(str(res.checkpoint))
    state = load_training_checkpoint(res.run_dir / CHECKPOINT)
    teacher = {k.removeprefix("backbone."): v for k, v in state["teacher"].items()
               if k.startswith("backbone.")}
    assert set(tensors) == set(teacher)
    assert all(torch.equal(tensors[k], teacher[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(res.checkpoint), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "vit_tiny_patch16_dinov3_test" and meta["in_chans"] == "3"
    assert meta["licence"] == "Apache-2.0" and "from random initialisation" in meta["training_lineage"]
    card = json.loads((res.run_dir / "model_card.json").read_text())
    from geo_dino.files import sha256_file

    assert card["model"]["sha256"] == sha256_file(res.checkpoint) == res.sha256
    assert {Path(r["path"]).name for r in card["data"]["rasters"]} == {BAHAMAS.name, NAIP.name}
    assert all(r["sha256"] == sha256_file(r["path"]) for r in card["data"]["rasters"])
    assert card["steps"] == 6 and card["hardware"]["device"] == "cpu"
    assert card["final_monitors"]["step"] == 6
    md = (res.run_dir / "model_card.md").read_text()
    assert res.sha256 in md and "Recipe" in md and "Remake" in md


def _run_in_two_parts(tmp_path: Path, name: str, workers: int = 0) -> tuple[list[dict], dict]:
    cfg = parse_pretrain_config(tiny(tmp_path, name, num_workers=workers))
    assert pretrain(cfg, stop_after=3) is None  # stops after step 3 with a checkpoint
    assert load_training_checkpoint(tmp_path / "runs" / name / CHECKPOINT)["step"] == 3
    res = pretrain(cfg)  # resumes at step 3
    return metrics(res.run_dir), load_file(str(res.checkpoint))


def test_a_resumed_run_continues_the_same_loss_curve(tmp_path: Path) -> None:
    straight = pretrain(parse_pretrain_config(tiny(tmp_path, "straight")))
    rows_a, w_a = metrics(straight.run_dir), load_file(str(straight.checkpoint))
    rows_b, w_b = _run_in_two_parts(tmp_path, "resumed")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows_a, rows_b, strict=True):
        for k in ("loss", "loss_dino", "loss_ibot", "loss_koleo", "loss_gram", "teacher_entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert all(torch.allclose(w_a[k], w_b[k], atol=1e-6) for k in w_a)
    # and a different seed gives a different curve (the comparison above can fail)
    other = pretrain(parse_pretrain_config(tiny(tmp_path, "other", seed=1)))
    assert metrics(other.run_dir)[-1]["loss"] != pytest.approx(rows_a[-1]["loss"], rel=1e-5)


def test_two_dataloader_workers_give_the_same_training(tmp_path: Path) -> None:
    a = pretrain(parse_pretrain_config(tiny(tmp_path, "w0", recipe={"steps": 3})))
    b = pretrain(parse_pretrain_config(tiny(tmp_path, "w2", num_workers=2, recipe={"steps": 3})))
    assert [r["loss"] for r in metrics(a.run_dir)] == pytest.approx([r["loss"] for r in metrics(b.run_dir)],
                                                                     rel=1e-6)


def test_resuming_with_another_recipe_is_refused(tmp_path: Path) -> None:
    pretrain(parse_pretrain_config(tiny(tmp_path, "r")), stop_after=3)
    changed = parse_pretrain_config(tiny(tmp_path, "r", recipe={"steps": 6, "batch_size": 4, "lr": 0.01}))
    with pytest.raises(ConfigError, match="different model/recipe"):
        pretrain(changed)


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    """torchrun with two gloo processes of batch 2 trains exactly as one process of batch 4: the same samples
    (indices s*B*W + r*B + j), gradients averaged by DDP, centres all-reduced. KoLeo (a per-process batch
    statistic) and drop-path (per-process draws) are off for the comparison."""
    common = {"recipe": {"steps": 4, "warmup_steps": 1, "lr": 0.05, "koleo_weight": 0.0, "ibot": {},
                         "gram": {"update_every": 2}},
              "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "drop_path_rate": 0.0}}
    ddp_cfg = tiny(tmp_path, "ddp", **common)
    ddp_cfg["recipe"]["batch_size"] = 2
    ddp_cfg["recipe"]["ibot"] = None  # masks are drawn per process: compared without them
    one_cfg = tiny(tmp_path, "one", **common)
    one_cfg["recipe"]["batch_size"] = 4
    one_cfg["recipe"]["ibot"] = None
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(ddp_cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --standalone: the rendezvous store binds a free port itself (no race for a port picked beforehand)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "geo_dino.training.pretrain", str(path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_rows = metrics(tmp_path / "runs" / "ddp")
    assert all(r["world_size"] == 2 for r in ddp_rows) and len(ddp_rows) == 4  # rank 0 alone writes
    single = pretrain(parse_pretrain_config(one_cfg))
    one_rows = metrics(single.run_dir)
    for a, b in zip(one_rows, ddp_rows, strict=True):
        assert b["loss_dino"] == pytest.approx(a["loss_dino"], rel=1e-4), a["step"]
        assert b["loss_gram"] == pytest.approx(a["loss_gram"], rel=1e-3, abs=1e-6), a["step"]
    s1 = load_training_checkpoint(single.run_dir / CHECKPOINT)["student"]
    s2 = load_training_checkpoint(tmp_path / "runs" / "ddp" / CHECKPOINT)["student"]
    worst = max(float((s1[k] - s2[k]).abs().max()) for k in s1)
    assert worst < 1e-4
    # the comparison can fail: one process with batch 2 trains differently
    half_cfg = tiny(tmp_path, "half", **common)
    half_cfg["recipe"]["batch_size"] = 2
    half_cfg["recipe"]["ibot"] = None
    half = pretrain(parse_pretrain_config(half_cfg))
    s3 = load_training_checkpoint(half.run_dir / CHECKPOINT)["student"]
    assert max(float((s1[k] - s3[k]).abs().max()) for k in s1) > 1e-3


def test_exported_backbone_runs_in_the_pipeline_without_licence_acceptance(tmp_path: Path) -> None:
    """Weights pretrained here declare their own licence: a DINOv3-architecture checkpoint made by geo_dino
    runs without a DINOv3 licence acceptance, its hash and lineage land in the provenance record."""
    from geo_dino.config import parse_config
    from geo_dino.run.stages import run_local

    res = pretrain(parse_pretrain_config(tiny(tmp_path, "exp", recipe={"steps": 2})))
    run_cfg = parse_config({
        "name": "with-pretrained", "aoi": str(ROOT / "aoi/bahamas_andros.geojson"), "rasters": [str(BAHAMAS)],
        "output_dir": str(tmp_path / "runs"),
        "backbone": {"arch": "vit_tiny_patch16_dinov3_test", "checkpoint": str(res.checkpoint),
                     "checkpoint_sha256": res.sha256},
        "tiling": {"size": 64, "overlap": 16}, "heads": {"kmeans": {"k": 3, "fit_tiles": 8}},
    }, ROOT)
    run_dir = run_local(run_cfg)
    record = json.loads((Path(run_dir) / "provenance.json").read_text())
    text = json.dumps(record)
    assert res.sha256 in text
    assert "DINO pretraining by geo_dino" in text


def test_a_five_band_pretraining_exports_a_five_band_backbone(tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    from geo_dino.models.backbone import build_backbone

    path = tmp_path / "five.tif"
    rng = np.random.default_rng(0)
    data = rng.integers(1, 2000, size=(5, 96, 96), dtype=np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=96, height=96, count=5, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    cfg = tiny(tmp_path, "five", recipe={"steps": 2})
    cfg["data"] = {"rasters": [str(path)], "tile_size": 64, "sources": {"allowed_roots": [str(tmp_path)]}}
    cfg["crops"] = {**cfg["crops"], "mean": [0.5] * 5, "std": [0.25] * 5}
    res = pretrain(parse_pretrain_config(cfg))
    model, spec = build_backbone("vit_tiny_patch16_dinov3_test", checkpoint=res.checkpoint)
    assert spec.in_chans == 5 and model.patch_embed.proj.in_channels == 5
    assert spec.mean == (0.5,) * 5 and spec.adaptation is None
    # mean/std of the wrong length: a clear error before training
    cfg["crops"] = {**cfg["crops"], "mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(ConfigError, match="5 bands"):
        pretrain(parse_pretrain_config({**cfg, "name": "five-bad"}))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe.stpes: unknown key"):
        parse_pretrain_config(tiny(tmp_path, recipe={"stpes": 3}))
    with pytest.raises(ConfigError, match="crops"):
        parse_pretrain_config(tiny(tmp_path, crops={"global_size": 16, "local_size": 32}))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny(tmp_path)))
    assert load_pretrain_config(p, {"recipe": {"steps": 9}}).recipe.steps == 9


def test_cli_pretrain_runs_the_flow_in_chunks(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from geo_dino.cli import app

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny(tmp_path, "cli", recipe={"steps": 4}, checkpoint_every=2)))
    result = CliRunner().invoke(app, ["pretrain", str(p)])
    assert result.exit_code == 0, result.output
    assert "backbone.safetensors" in result.output
    rows = metrics(tmp_path / "runs" / "cli")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    bad = CliRunner().invoke(app, ["pretrain", str(tmp_path / "missing.yaml")])
    assert bad.exit_code != 0 and "not found" in bad.output


def test_layerscale_init_applies_to_models_built_from_scratch_only(tmp_path: Path) -> None:
    from geo_dino.models.backbone import build_backbone

    model, _ = build_backbone("vit_tiny_patch16_dinov3_test", layerscale_init=0.1)
    gammas = [p for n, p in model.named_parameters() if "gamma" in n]
    assert gammas and all(torch.allclose(g, torch.full_like(g, 0.1)) for g in gammas)
    default, _ = build_backbone("vit_tiny_patch16_dinov3_test")
    assert all(float(p.abs().max()) < 1e-4 for n, p in default.named_parameters() if "gamma" in n)
    # continued pretraining keeps the checkpoint's LayerScale values
    res = pretrain(parse_pretrain_config(tiny(tmp_path, "ls", recipe={"steps": 1})))
    cont = tiny(tmp_path, "ls2", recipe={"steps": 1})
    cont["backbone"] = {**cont["backbone"], "checkpoint": str(res.checkpoint), "layerscale_init": 0.5}
    cfg = parse_pretrain_config(cont)
    from geo_dino.training.pretrain import _modules

    student, _, _ = _modules(cfg, 3)
    start = load_file(str(res.checkpoint))
    assert all(torch.equal(p.detach(), start[n.removeprefix("backbone.")])
               for n, p in student.named_parameters() if "gamma" in n)


@pytest.mark.slow
def test_cli_pretrain_with_two_processes_goes_through_torchrun(tmp_path: Path) -> None:
    """`geo-dino pretrain --nproc 2`: the flow starts torchrun (two gloo processes) and relays its metrics."""
    from typer.testing import CliRunner

    from geo_dino.cli import app

    cfg = tiny(tmp_path, "cli2", recipe={"steps": 2}, threads=1)
    p = tmp_path / "c2.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = CliRunner().invoke(app, ["pretrain", str(p), "--nproc", "2"])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert result.exit_code == 0, result.output
    rows = metrics(tmp_path / "runs" / "cli2")
    assert [r["step"] for r in rows] == [1, 2] and all(r["world_size"] == 2 for r in rows)
    card = json.loads((tmp_path / "runs" / "cli2" / "model_card.json").read_text())
    assert card["hardware"]["processes"] == 2 and "--nproc 2" in card["remake"]


def test_in_training_knn_evaluation_is_logged_and_in_the_model_card(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "knn", recipe={"steps": 2},
               eval={"data": str(ROOT / "data/eurosat_mini/labels.csv"), "every": 2, "k": 5})
    res = pretrain(parse_pretrain_config(cfg))
    rows = metrics(res.run_dir)
    assert "knn" not in rows[0] and 0.0 <= rows[1]["knn"]["top1"] <= 1.0
    assert rows[1]["knn"]["n_test"] == 60 and rows[1]["knn"]["k"] == 5
    assert "k-NN top-1" in (res.run_dir / "model_card.md").read_text()
