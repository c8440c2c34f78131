"""Loggers: W&B (offline by default), CSV or none, plus metrics.json, which every run writes."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from blocktrain.trainer.io import write_json


class JsonMetricsLogger(Logger):
    """Keeps the latest value of every logged metric and writes them, with the run status, to metrics.json.

    ``status`` is "running" until the run ends as "finished", "failed" or "interrupted", so a half-done
    run never looks finished; ``stage`` names the stage the run is in (or stopped in).
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.metrics: dict[str, float] = {}
        self.status = "running"
        self.step = 0
        self.stage = None  # the current Stage, set by the engine

    @property
    def name(self) -> str:
        return "metrics_json"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update({k: float(v) for k, v in metrics.items() if k != "epoch"})
        self.step = step if step is not None else self.step
        self.write()

    @rank_zero_only
    def write(self, **extra: Any) -> None:
        stage = self.stage.name if self.stage is not None else None
        write_json(self.path, {"status": self.status, "stage": stage, "step": self.step,
                               "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": self.metrics, **extra})

    def set_status(self, status: str, **extra: Any) -> None:
        self.status = status
        self.write(**extra)


def wandb_run_id(run_dir: Path) -> str:
    """The run dir's W&B id, created once and reused by ``resume=auto``."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg, run_dir: Path, config_dict: dict) -> list[Logger]:
    """The configured logger (wandb/csv/none) followed by the metrics.json logger."""
    loggers: list[Logger] = []
    kind = cfg.logger.kind
    if kind == "wandb":
        mode = cfg.logger.mode or os.environ.get("WANDB_MODE") or "offline"
        run_dir.joinpath("wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                                   tags=list(cfg.logger.tags), name=f"{cfg.name}-{run_dir.name}", save_dir=str(run_dir),
                                   id=wandb_run_id(run_dir), resume="allow", mode=mode, config=config_dict))
    elif kind == "csv":
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    loggers.append(JsonMetricsLogger(run_dir / "metrics.json"))
    return loggers


def finish_wandb(loggers: list[Logger], exit_code: int) -> None:
    """Close this run's W&B run so the next multirun job starts its own."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg._experiment.finish(exit_code=exit_code)
