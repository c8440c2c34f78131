"""The pruning plugins ``magnitude``, ``wanda`` and ``sparsegpt``: the sparsity cores bound to a run.

Each prunes every ``nn.Linear`` but those named in ``exclude`` in its ``calibrate`` stage, leaving real
zeros in the weights; ``evaluate`` writes the per-layer sparsity report (and lm-eval scores when asked);
the engine's ``export`` saves the pruned model (``save_pretrained``). Wanda and SparseGPT prune layer by
layer and resume from the last saved layer. This module imports no torch, so configs validate first.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blocktrain.trainer.compression.config import CalibrationConfig, check_density, check_pattern
from blocktrain.trainer.compression.pruning import PruningPlugin, SparsityConfig
from blocktrain.trainer.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class MagnitudeConfig(SparsityConfig):
    """``plugin.magnitude``: keep the largest |W|."""

    pattern: str = "layer"  # layer | row (per output) | N:M, e.g. "2:4"

    def __post_init__(self):
        check_density(self.density, "plugin.magnitude")
        check_pattern(self.pattern, self.density, ("layer", "row"), "plugin.magnitude")


@dataclass
class LayerwiseConfig(SparsityConfig):
    """Keys of the plugins that calibrate layer by layer on N samples of the train split."""

    pattern: str = "layer"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sequential: bool = True  # each layer group calibrated on the inputs of the model pruned so far
    save_every_s: float = 300.0  # resumable state written at most this often (and on Ctrl-C, and at the end)


@dataclass
class WandaConfig(LayerwiseConfig):
    """``plugin.wanda``: keep the largest |W|·‖X‖₂ (Sun et al. 2023); per output row by default, as the paper."""

    pattern: str = "row"  # row (per output, the paper) | layer | N:M, e.g. "2:4"

    def __post_init__(self):
        check_density(self.density, "plugin.wanda")
        check_pattern(self.pattern, self.density, ("layer", "row"), "plugin.wanda")
        self.calibration.check("plugin.wanda.calibration")


@dataclass
class SparseGPTConfig(LayerwiseConfig):
    """``plugin.sparsegpt``: OBS pruning with weight updates (Frantar & Alistarh 2023)."""

    pattern: str = "layer"  # layer | N:M, e.g. "2:4"
    blocksize: int = 128  # columns pruned and updated together
    damp: float = 0.01  # Hessian dampening, as a fraction of its mean diagonal

    def __post_init__(self):
        check_density(self.density, "plugin.sparsegpt")
        check_pattern(self.pattern, self.density, ("layer",), "plugin.sparsegpt")
        self.calibration.check("plugin.sparsegpt.calibration")
        m = int(self.pattern.split(":")[1]) if ":" in self.pattern else 1
        if self.blocksize < 1 or self.blocksize % m:
            raise UserError(f"plugin.sparsegpt.blocksize must be a positive multiple of {m}, got {self.blocksize}")
        if self.damp <= 0:
            raise UserError(f"plugin.sparsegpt.damp must be > 0, got {self.damp}")


class MagnitudePlugin(PruningPlugin):
    """Keep the largest |W| of each layer (or row, or N of every M inputs); no data needed."""

    name = "magnitude"
    description = "Magnitude pruning (unstructured or N:M) of every Linear; the data-free baseline"
    config_class = MagnitudeConfig

    def prune(self, model, run):
        from blocktrain.plugins.sparsity.wanda import magnitude_prune

        magnitude_prune(model, self.config.density, self.names, self.config.pattern)


class LayerwisePruningPlugin(PruningPlugin):
    """Calibrate layer group by layer group (``calibrate_layers``); each finished layer joins the resumable
    state, so ``resume=auto`` restores the finished layers and calibrates only the rest."""

    config_class = LayerwiseConfig

    def make_stats(self, module: "torch.nn.Module") -> Any:
        """The statistics object filled from a layer group's inputs."""
        raise NotImplementedError

    def prune_layer(self, module: "torch.nn.Module", stats: Any) -> dict:
        """Prune one layer in place from its statistics; return what restores it: ``{"mask"[, "weight"]}``."""
        raise NotImplementedError

    def prune(self, model, run):
        import torch

        from blocktrain.trainer.compression.replay import calibrate_layers
        from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
        from blocktrain.trainer.compression.state import ResumableState

        c = self.config
        state = ResumableState(run, self.name, dataclasses.asdict(c), c.save_every_s, free=("save_every_s", "lm_eval"))
        done: dict[str, dict] = state.load() or {}
        with torch.no_grad():
            for name, entry in done.items():
                weight = model.get_submodule(name).weight
                if "weight" in entry:
                    weight.copy_(entry["weight"])
                else:
                    weight.masked_fill_(~entry["mask"].to(weight.device), 0)
        remaining = [n for n in self.names if n not in done]
        if done:
            print(f"{self.name}: resumed with {len(done)} of {len(self.names)} layers pruned", file=sys.stderr)
        if remaining:
            cal = c.calibration
            batches = calibration_batches(run.data, cal.samples, cal.batch_size, self.seed(cal, run), run.device,
                                          where=f"plugin.{self.name}.calibration")

            def snapshot() -> dict:  # one pass over the unpruned model fills every layer at once: all or nothing
                return done if c.sequential or len(done) == len(self.names) else {}

            with state.steps(len(remaining), f"{self.name}: pruning {len(remaining)} layers", snapshot) as step_done:

                def finish(name, module, stats):
                    done[name] = self.prune_layer(module, stats)
                    step_done()

                calibrate_layers(model, remaining, batches, calibration_forward, self.make_stats, finish, c.sequential)
        state.save(done)


class WandaPlugin(LayerwisePruningPlugin):
    """Wanda: keep the largest |W|·√(Σ x²) per output row (or layer, or N:M)."""

    name = "wanda"
    description = "Wanda pruning (|W|·‖X‖, unstructured or N:M) of every Linear; iCBS's starting mask"
    config_class = WandaConfig

    def make_stats(self, module):
        from blocktrain.trainer.compression.scores import InputSquares

        return InputSquares()

    def prune_layer(self, module, stats):
        import torch

        from blocktrain.trainer.compression.masks import mask_from_scores
        from blocktrain.trainer.compression.scores import wanda_scores

        keep = mask_from_scores(wanda_scores(module.weight, stats.sums), self.config.density, self.config.pattern)
        with torch.no_grad():
            module.weight.masked_fill_(~keep, 0)
        return {"mask": keep.cpu()}


class SparseGPTPlugin(LayerwisePruningPlugin):
    """SparseGPT: OBS pruning with the remaining weights updated through the inverse input Hessian."""

    name = "sparsegpt"
    description = "SparseGPT one-shot pruning with OBS weight updates (unstructured or N:M) of every Linear"
    config_class = SparseGPTConfig

    def make_stats(self, module):
        from blocktrain.trainer.compression.hessian import HessianAccumulator

        return HessianAccumulator(module.in_features, device=module.weight.device)

    def prune_layer(self, module, stats):
        import torch

        from blocktrain.plugins.sparsity.sparsegpt import sparsegpt_layer

        c = self.config
        weight, keep = sparsegpt_layer(module.weight, stats.H, c.density, c.pattern, c.blocksize, c.damp)
        with torch.no_grad():
            module.weight.copy_(weight)
        return {"mask": keep.cpu(), "weight": weight.cpu()}
