"""The base of pruning plugins: the layers pruned, the one-pruner rule, the calibrate timing, the sparsity
report and lm-eval scores. Torch-free at import, so the plugins' configs validate before anything loads."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List

from blocktrain.trainer.compression.config import CalibrationConfig, LmEvalConfig
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin, PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext

__all__ = ["SparsityConfig", "PruningPlugin"]


@dataclass
class SparsityConfig(PluginConfig):
    """Keys every pruning plugin has: the density kept per layer, the layers left dense, lm-eval tasks."""

    density: float = 0.5  # fraction of each target layer's weights kept
    exclude: List[str] = field(default_factory=lambda: ["lm_head"])  # Linear names (last part) left dense
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)



class PruningPlugin(Plugin):
    """Base of the pruning plugins: targets, the one-pruner rule, the sparsity report and lm-eval."""

    config_class = SparsityConfig
    kind = "prune"
    conflicts = ("prune",)  # each pruning plugin starts from the original weights

    def __init__(self, config):
        cls = self.config_class
        super().__init__(config if isinstance(config, cls) else cls(**dict(config)))
        self.names: list[str] = []

    def check_pipeline(self, before: list[Plugin]) -> None:
        quantizer = next((p for p in before if p.kind == "quantize"), None)
        if quantizer is not None:
            raise UserError(f"plugin {self.name} prunes full-precision Linears, so it must come before the quantizer "
                            f"{quantizer.name}: plugin=[{self.name},{quantizer.name}] (its zeros stay zero)")

    def apply(self, model: "torch.nn.Module", run: "RunContext") -> "torch.nn.Module":
        from blocktrain.trainer.compression.masks import find_linear_names

        self.names = find_linear_names(model, exclude=tuple(self.config.exclude))
        if not self.names:
            raise UserError(f"plugin {self.name}: the model has no nn.Linear layers to prune outside "
                            f"plugin.{self.name}.exclude={list(self.config.exclude)}")
        if self.config.lm_eval.tasks:
            from blocktrain.trainer.compression.evaluation import require_lm_eval

            require_lm_eval(f"plugin.{self.name}.lm_eval")
        return model

    def calibrate(self, model: "torch.nn.Module", run: "RunContext") -> None:
        start = time.perf_counter()
        self.prune(model, run)
        run.log({f"{self.name}/calibrate_time_s": time.perf_counter() - start})

    def prune(self, model: "torch.nn.Module", run: "RunContext") -> None:
        """Prune ``self.names`` of ``model`` in place."""
        raise NotImplementedError

    def evaluate(self, model: "torch.nn.Module", run: "RunContext") -> dict[str, float]:
        from blocktrain.trainer.compression.report import report_sparsity

        metrics = report_sparsity(model, self.names, run, target=self.config.density)
        lm = self.config.lm_eval
        if lm.tasks:
            from blocktrain.trainer.compression.evaluation import lm_eval_scores

            metrics.update(lm_eval_scores(model, run.tokenizer, list(lm.tasks), lm.num_fewshot, lm.batch_size, lm.limit,
                                          lm.include_path))
        return metrics

    def seed(self, calibration: CalibrationConfig, run: "RunContext") -> int:
        return int(run.cfg.seed if calibration.seed is None else calibration.seed)
