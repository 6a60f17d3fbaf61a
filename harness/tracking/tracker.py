"""Experiment tracking: one W&B run per harness run (offline unless asked), or CSV, or none.

Each training stage gets a Lightning logger onto the same W&B run, prefixed by the stage name.
W&B is always finished, so the next job of a ``-m`` sweep opens its own run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_name(run) -> str:
    """The tracker's name for a run: its defense, attack, task, model and seed."""
    return (f"{run.defense.name}-p{run.attack.p}-n{run.attack.n}-{run.task.name}"
            f"-{run.model.name}-s{run.seed}")


def run_tags(run) -> list[str]:
    """The tracker's tags for a run, one per axis a study compares along."""
    return [f"defense:{run.defense.name}", f"p:{run.attack.p}", f"n:{run.attack.n}",
            f"task:{run.task.name}", f"model:{run.model.name}", f"seed:{run.seed}",
            f"protocol:{run.protocol.name}"]


class Tracker:
    def __init__(self, cfg, run_dir: Path, name: str, config: dict[str, Any], tags: list[str]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run = None
        if cfg.kind == "wandb" and cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group,
                                  name=name, tags=list(cfg.tags) + tags, mode=cfg.mode,
                                  dir=str(self.run_dir), config=flatten(config),
                                  reinit="finish_previous")

    def stage_logger(self, stage: str):
        if self.run is not None:
            from lightning.pytorch.loggers import WandbLogger

            return WandbLogger(experiment=self.run, prefix=stage)
        if self.cfg.kind == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(save_dir=str(self.run_dir / "csv"), name=stage, version="")
        return False

    def log_metrics(self, metrics: dict[str, dict]) -> None:
        if self.run is None:
            return
        for stage, values in metrics.items():
            for k, v in flatten(values).items():
                if isinstance(v, (int, float)):
                    self.run.summary[f"{stage}/{k}"] = v

    def log_generations(self, stage: str, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.run.log({f"{stage}/generations": wandb.Table(
            columns=columns, data=[[r[c] for c in columns] for r in rows])})

    def finish(self, status: str, error: Optional[str] = None) -> None:
        if self.run is None:
            return
        self.run.summary["status"] = status
        if error:
            self.run.summary["error"] = error[-2000:]
        self.run.finish(exit_code=0 if status == "ok" else 1)
        self.run = None
