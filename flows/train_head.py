"""Training a supervised head as a Prefect flow: prepare → frozen features and spatial split → train, score,
write.

Tasks pass the run folder's path and small records; features stay in the run folder's ``work/`` between
tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from geo_dino.training import train_head as th
from geo_dino.training.head_config import HeadTrainConfig, load_head_config, parse_head_config

_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="prepare-head-training", **_TASK)
def prepare(cfg: HeadTrainConfig, flow_run_id: str | None) -> str:
    """Create the training run folder with its resolved config; return its path."""
    return str(th.prepare_training(cfg, flow_run_id=flow_run_id))


@task(name="labels-features-and-split", **_TASK)
def features(run_dir: str) -> dict[str, Any]:
    """Put the labels on the grid, extract the labelled tiles' frozen features and split them; tile counts."""
    return th.extract_training_features(Path(run_dir))


@task(name="train-and-score-head", **_TASK)
def train(run_dir: str) -> dict[str, Any]:
    """Train the head, score it on the test tiles and write it; the test metrics and the head file's path."""
    return th.fit_and_write_head(Path(run_dir))


@flow(name="train_head", log_prints=True)
def train_head_flow(config_path: str | None = None, config: dict[str, Any] | None = None,
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a head on labelled rasters. Give a YAML ``config_path`` or a ``config`` mapping. Returns the
    test metrics and the head file's path."""
    from prefect.runtime import flow_run

    log = get_run_logger()
    if config_path is not None:
        cfg = load_head_config(config_path, overrides)
    elif config is not None:
        cfg = parse_head_config(config)
    else:
        raise ValueError("give config_path or config")
    run_dir = prepare(cfg, flow_run.get_id())
    log.info("run folder: %s", run_dir)
    f = features(run_dir)
    log.info("%d labelled tiles (%d fit, %d early stopping, %d test, %d dropped), %d feature channels",
             f["tiles"], f["fit"], f["early_stopping"], f["test"], f["dropped"], f["channels"])
    res = train(run_dir)
    log.info("test mIoU %.3f, macro F1 %.3f after %d validation measurements", res["test_miou"],
             res["test_macro_f1"], res["measurements"])
    create_markdown_artifact(key="head-metrics", description="held-out test metrics of the trained head",
                             markdown=f"| test mIoU | test macro F1 | head |\n|---|---|---|\n"
                                      f"| {res['test_miou']:.3f} | {res['test_macro_f1']:.3f} | "
                                      f"`{res['head']}` |")
    return res | {"run_dir": run_dir}
