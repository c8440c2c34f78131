"""The plugin contract: a thin adapter binding a method's functional core to a run.

A plugin never re-implements devices, precision, optimisers, checkpoints or logging; it only says
what it does to the model and, where it has them, its objective, calibrate loop, metrics and exports.
Every hook is optional. This module imports nothing heavy, so listing plugins stays fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext
    from blocktrain.trainer.stages import Stage


def lazy_exports(package: str, exports: Mapping[str, str]):
    """A module ``__getattr__`` importing each public name from its submodule on first use.

    ``exports`` maps a name to a submodule of ``package`` (or to an absolute module path), so a plugin
    package can list its core without importing torch when only its config is needed.
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name]
        return getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)

    return __getattr__


@dataclass
class PluginConfig:
    """Base class of every plugin's structured config (a dataclass validated before any model loads)."""


class Plugin:
    """Base class of all plugins. Subclasses set ``name``, ``description``, ``config_class`` and ``kind``.

    ``kind`` (adapter, prune, quantize, objective, model, ...) is what ``requires``, ``conflicts`` and
    ``refuses_after`` may name besides plugin names: ``requires`` must appear earlier in the run's plugin
    list, ``conflicts`` nowhere else in it, ``refuses_after`` not later in it; the engine checks them at
    config time.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[PluginConfig]] = PluginConfig
    kind: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    refuses_after: ClassVar[tuple[str, ...]] = ()  # may not come later in the list (e.g. an adapter: "quantize")
    replaces_task_loss: ClassVar[bool] = False  # True: this plugin's loss is the objective; the task's is not added

    def __init__(self, config: PluginConfig):
        self.config = config

    # -- config time -------------------------------------------------------------------------
    def check_pipeline(self, before: list["Plugin"]) -> None:
        """Raise ``UserError`` if this plugin cannot follow the plugins listed before it (beyond
        ``requires``/``conflicts``, which the engine checks)."""

    # -- model surgery -----------------------------------------------------------------------
    def apply(self, model: "torch.nn.Module", run: "RunContext") -> "torch.nn.Module":
        """Transform the model (add adapters, masks, quantizers). Returns the model to use."""
        return model

    # -- stages ----------------------------------------------------------------------------------
    def on_stage_start(self, stage: "Stage", model: "torch.nn.Module", run: "RunContext") -> None:
        """Called before each stage (``stage.kind``, ``stage.name``, ``stage.settings``), e.g. to choose
        what a fit phase trains."""

    # -- training ------------------------------------------------------------------------------
    def loss(self, model: "torch.nn.Module", batch: Any, run: "RunContext") -> "torch.Tensor | Mapping[str, torch.Tensor] | None":
        """Loss terms for a batch: a tensor or named tensors, each logged (``train/loss/<plugin>[/<name>]``)
        and summed with the other plugins' and the task's (unless ``replaces_task_loss``); ``None``: none."""
        return None

    def param_groups(self, model: "torch.nn.Module", run: "RunContext") -> list[dict]:
        """Optimiser parameter groups with their own settings, e.g. ``[{"params": [...], "lr": 1e-3}]``;
        the trainable parameters in no group take the optimiser preset's settings."""
        return []

    def callbacks(self, run: "RunContext") -> list:
        """Lightning callbacks this plugin needs (schedules, curricula)."""
        return []

    # -- post-training -------------------------------------------------------------------------
    def calibrate(self, model: "torch.nn.Module", run: "RunContext") -> None:
        """The `calibrate` stage (pruning, quantization). Use ``run.progress`` and ``run.save_state``."""

    def eval_sums(self, model: "torch.nn.Module", batch: Any, run: "RunContext") -> Mapping[str, tuple[float, int]]:
        """Metrics on a val batch as ``{name: (sum, count)}``, inside Lightning's validate loop: the engine
        sums them over the split and across processes and logs ``val/<name>`` = sum / count."""
        return {}

    def evaluate(self, model: "torch.nn.Module", run: "RunContext") -> Mapping[str, float]:
        """Whole-model metrics for the `evaluate` stage (after the validate loop), e.g. a sparsity report."""
        return {}

    def sample(self, model: "torch.nn.Module", run: "RunContext") -> Mapping[str, Any]:
        """The `sample` stage: scalars are logged; other values (image tensors or PIL images, lists of
        texts, ``Table``\ s) go to ``RunContext.log_media`` (W&B media and files in the run dir)."""
        return {}

    def export(self, model: "torch.nn.Module", out_dir: Path, run: "RunContext") -> Iterable[Path]:
        """Write this plugin's export formats under ``out_dir``; return the paths written."""
        return []

    def load_weights(self, model: "torch.nn.Module", path: Path) -> bool:
        """Load this plugin's own export (e.g. an adapter) for ``init_from``; True if it did."""
        return False

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plugin state (beyond module parameters) saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
