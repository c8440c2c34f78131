"""The ``lora`` plugin: binds the adapter library's plain LoRA to a run (surgery, export, ``init_from``).

This module imports no torch, so a run's config is validated before anything heavy loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from blocktrain.trainer.adapters.checks import check_export, check_lora_args, check_targets
from blocktrain.trainer.adapters.plugin import AdapterPlugin
from blocktrain.trainer.plugin import PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext

EXPORT_FORMATS = ("adapter", "peft", "merged")  # each is written to out_dir/<format>/


@dataclass
class LoraConfig(PluginConfig):
    """``plugin.lora``: where LoRA goes, its hyper-parameters and what the export stage writes."""

    targets: Any = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names (suffix match) or a regex
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    scaling: str = "rank"  # rank: alpha/r (Hu et al.); sqrt_rank: alpha/sqrt(r) (rsLoRA)
    modules_to_save: list[str] = field(default_factory=list)  # kept fully trainable and exported, e.g. [classifier]
    export: list[str] = field(default_factory=lambda: ["adapter", "peft"])

    def __post_init__(self):
        check_lora_args(self.rank, self.alpha, self.dropout, self.scaling)
        self.targets = check_targets(self.targets, "plugin.lora.targets")
        self.modules_to_save = [str(m) for m in self.modules_to_save]
        self.export = check_export(self.export, EXPORT_FORMATS, "plugin.lora.export")


class LoraPlugin(AdapterPlugin):
    """LoRA adapters on chosen Linear layers; exports our adapter, a PEFT adapter and/or the merged model."""

    name = "lora"
    description = "LoRA adapters on chosen Linear layers of any transformers/timm model"
    config_class = LoraConfig

    def apply(self, model: "torch.nn.Module", run: "RunContext") -> "torch.nn.Module":
        from blocktrain.trainer.adapters.surgery import apply_lora

        c = self.config
        model = apply_lora(model, targets=c.targets, rank=c.rank, alpha=c.alpha, dropout=c.dropout,
                           scaling=c.scaling, modules_to_save=c.modules_to_save)
        return self.check_export(model)

    def writers(self) -> dict[str, Callable]:
        from blocktrain.trainer.adapters import export

        return {"adapter": export.save_adapter, "peft": export.save_peft_adapter, "merged": export.save_merged}

    def adapter_reader(self) -> tuple[Callable, Callable]:
        from blocktrain.trainer.adapters.export import is_adapter_dir, load_adapter

        return is_adapter_dir, load_adapter
