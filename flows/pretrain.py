"""DINO pretraining as a Prefect flow.

One process: the schedule runs in chunks of ``checkpoint_every`` steps, one task each; every chunk resumes
from the run folder's checkpoint, so a retried or re-run flow continues where it stopped. Several processes
(``nproc > 1``): one task starts ``torchrun`` (DDP; gloo on CPU, NCCL on GPUs) and follows its
``metrics.jsonl``. Each chunk logs steps, loss, collapse monitors and images/s, and updates a progress
artifact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from geo_dino.training.pretrain_config import PretrainConfig, load_pretrain_config, parse_pretrain_config

_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def _fmt(rec: dict[str, Any]) -> str:
    s = (f"step {rec['step']}: loss {rec['loss']:.4f}, teacher entropy {rec['teacher_entropy']:.3f}, "
         f"KL {rec['kl_student_teacher']:.4f}, feature std {rec['feature_std']:.4f}, "
         f"{rec['images_per_s']:.1f} images/s")
    if "knn" in rec:
        s += f", k-NN top-1 {rec['knn'].get('top1')}"
    return s


def _progress_reporter(total: int, artifact_id: Any) -> Any:
    logger = get_run_logger()

    def report(rec: dict[str, Any]) -> None:
        logger.info(_fmt(rec))
        for w in rec.get("collapse_warnings", []):
            logger.warning(w)
        if artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id, progress=100.0 * rec["step"] / total)

    return report


@task(name="train-chunk", **_TASK)
def train_chunk(config: dict[str, Any], steps: int, artifact_id: Any = None,
                config_file: str | None = None) -> dict[str, Any] | None:
    """Train up to ``steps`` more steps in this process, resuming from the run folder's checkpoint; the
    exported backbone (checkpoint, sha256, run folder, warnings) once the schedule is complete, else None."""
    from geo_dino.training.pretrain import pretrain

    cfg = PretrainConfig.model_validate(config)
    res = pretrain(cfg, progress=_progress_reporter(cfg.recipe.steps, artifact_id), stop_after=steps,
                   config_file=config_file)
    if res is None:
        return None
    return {"checkpoint": str(res.checkpoint), "sha256": res.sha256, "run_dir": str(res.run_dir),
            "warnings": res.warnings}


@task(name="train-torchrun", **_TASK)
def train_torchrun(config_file: str, nproc: int, run_dir: str, total: int,
                   artifact_id: Any = None) -> dict[str, Any]:
    """Start ``torchrun --nproc_per_node nproc -m geo_dino.training.pretrain`` and relay its metrics while it
    runs."""
    report = _progress_reporter(total, artifact_id)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "geo_dino.training.pretrain", config_file]
    metrics = Path(run_dir) / "metrics.jsonl"
    # a file, not a pipe: a pipe nobody reads fills and blocks ranks
    log_path = Path(run_dir) / "torchrun.log"
    seen = 0
    with (log_path.open("w") as log,
          subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True) as proc):
        while proc.poll() is None:
            time.sleep(1.0)
            seen = _relay(metrics, seen, report)
        seen = _relay(metrics, seen, report)
    out_lines = log_path.read_text().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode} (whole log: {log_path}):\n"
                           + "\n".join(out_lines[-40:]))
    result = json.loads(next(line for line in reversed(out_lines) if line.startswith('{"checkpoint"')))
    return result | {"run_dir": run_dir}


def _relay(metrics: Path, offset: int, report: Any) -> int:
    """Report the complete lines written to ``metrics`` since byte ``offset``; return the new offset."""
    if not metrics.exists():
        return offset
    with metrics.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
    for line in chunk[:end].decode().splitlines():
        report(json.loads(line))
    return offset + end


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config_path: str | None = None, config: dict[str, Any] | None = None,
                  overrides: dict[str, Any] | None = None, nproc: int = 1,
                  config_file: str | None = None) -> dict[str, Any]:
    """Pretrain a backbone on rasters. Give a YAML ``config_path`` or a ``config`` mapping; ``nproc`` > 1 runs
    DDP through torchrun. Returns the exported checkpoint's path and sha256. ``config_file`` names the YAML a
    ``config`` mapping came from (for the model card)."""
    from prefect.artifacts import create_progress_artifact

    from geo_dino.training.pretrain import run_dir_for

    if config_path is not None:
        cfg = load_pretrain_config(config_path, overrides)
        config_file = config_file or config_path
    elif config is not None:
        cfg = parse_pretrain_config(config)
    else:
        raise ValueError("give config_path or config")
    artifact_id = create_progress_artifact(progress=0.0, description=f"pretraining {cfg.name}")
    run_dir = run_dir_for(cfg)
    if nproc > 1:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = run_dir / "pretrain_config.yaml"
        import yaml

        resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return train_torchrun(str(resolved), nproc, str(run_dir), cfg.recipe.steps, artifact_id)
    data = cfg.model_dump(mode="json")
    done = None
    while done is None:
        done = train_chunk(data, cfg.checkpoint_every, artifact_id, config_file)
    return done
