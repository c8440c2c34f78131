"""What a plugin sees of the run: config, run dir, tokenizer, data, logging, progress and state."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from blocktrain.trainer.io import torch_save

T = TypeVar("T")


@dataclass
class RunContext:
    """Handed to every plugin hook. ``metrics`` is the run's ``MetricsSink`` (loggers + metrics.json)."""

    cfg: Any
    run_dir: Path
    metrics: Any
    tokenizer: Any = None
    data: Any = None
    task: Any = None  # the run's Task (objective, metrics, per-sample loss), built before the plugins apply
    device: str = "cpu"
    trainer: Any = None  # the Lightning Trainer, once built
    resuming: bool = False  # resume=auto/PATH: plugins continue from their saved state (load_state)
    stage: Any = None  # the Stage running now (kind, name, settings)
    extras: dict = field(default_factory=dict)

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        """Log scalars to every logger and record them in metrics.json."""
        self.metrics.log(values, step=step)

    def log_media(self, values: dict[str, Any], step: int | None = None) -> list[Path]:
        """Write images, lists of texts and ``Table``\ s (``trainer/media.py``) under ``run_dir/media/`` and log
        them to W&B, in one row, when W&B is the logger; return the files written."""
        from pytorch_lightning.loggers import WandbLogger

        from blocktrain.trainer.media import write_media

        step = self.trainer.global_step if step is None and self.trainer is not None else (step or 0)
        written = {key: write_media(self.run_dir / "media", key, value, step) for key, value in values.items()}
        for logger in getattr(self.trainer, "loggers", None) or []:
            if isinstance(logger, WandbLogger):
                logger.experiment.log({**{k: shown for k, (_, shown) in written.items()}, "trainer/global_step": step})
        return [path for path, _ in written.values()]

    def progress(self, iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Iterate with a rich progress bar (plain log lines when not on a terminal)."""
        from blocktrain.trainer.progress import track

        return track(iterable, total=total, description=description)

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    def save_state(self, name: str, obj: Any) -> None:
        """Atomically save resumable state (e.g. a calibrate loop's progress) under the run dir."""
        torch_save(obj, self.state_dir / f"{name}.pt")

    def load_state(self, name: str) -> Any | None:
        """The state saved under ``name`` by an earlier (interrupted) run, or None."""
        import torch

        path = self.state_dir / f"{name}.pt"
        return torch.load(path, weights_only=False) if path.exists() else None
