"""The ``lora`` plugin: binds the LoRA core to a run (surgery, export, ``init_from``).

This module imports no torch, so a run's config is validated before anything heavy loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from blocktrain.plugins.lora.checks import check_lora_args
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin, PluginConfig

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
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise UserError(f"plugin.lora.targets {self.targets!r} is not a valid regex: {exc}") from None
        else:
            if isinstance(self.targets, (int, float, bool)) or self.targets is None or not list(self.targets):
                raise UserError("plugin.lora.targets must be a non-empty list of module names or a regex string, "
                                f"got {self.targets!r}")
            self.targets = [str(t) for t in self.targets]
        self.modules_to_save = [str(m) for m in self.modules_to_save]
        self.export = [str(f) for f in self.export]
        unknown = [f for f in self.export if f not in EXPORT_FORMATS]
        if unknown:
            raise UserError(f"unknown plugin.lora.export format {unknown[0]!r}. Valid formats: "
                            f"{', '.join(EXPORT_FORMATS)}")


class LoraPlugin(Plugin):
    """LoRA adapters on chosen Linear layers; exports our adapter, a PEFT adapter and/or the merged model.

    Adapter plugins that wrap the same Linear layers (``blocklora``) subclass it for config handling,
    the one-adapter rule, export and ``init_from``.
    """

    name = "lora"
    description = "LoRA adapters on chosen Linear layers of any transformers/timm model"
    config_class = LoraConfig
    kind = "adapter"
    conflicts = ("adapter",)  # a model takes one (Block-)LoRA adapter

    def __init__(self, config):
        cls = self.config_class
        super().__init__(config if isinstance(config, cls) else cls(**dict(config)))

    def apply(self, model: "torch.nn.Module", run: "RunContext") -> "torch.nn.Module":
        from blocktrain.plugins.lora.surgery import apply_lora

        c = self.config
        return apply_lora(model, targets=c.targets, rank=c.rank, alpha=c.alpha, dropout=c.dropout,
                          scaling=c.scaling, modules_to_save=c.modules_to_save)

    def writers(self) -> dict[str, Callable]:
        """Export format name -> ``writer(model, out_dir) -> paths``."""
        from blocktrain.plugins.lora import export

        return {"adapter": export.save_adapter, "peft": export.save_peft_adapter, "merged": export.save_merged}

    def adapter_reader(self) -> tuple[Callable, Callable]:
        """(is_adapter_dir, load_adapter) for this plugin's own adapter format."""
        from blocktrain.plugins.lora.export import is_adapter_dir, load_adapter

        return is_adapter_dir, load_adapter

    def export(self, model: "torch.nn.Module", out_dir: Path, run: "RunContext") -> Iterable[Path]:
        writers = self.writers()
        written = []
        for fmt in self.config.export:
            written += writers[fmt](model, Path(out_dir) / fmt)
        tokenizer = getattr(run, "tokenizer", None)
        if "merged" in self.config.export and hasattr(tokenizer, "save_pretrained"):
            written += [Path(p) for p in tokenizer.save_pretrained(Path(out_dir) / "merged")]
        return written

    def load_weights(self, model: "torch.nn.Module", path: Path) -> bool:
        """Load our adapter from ``path``: an adapter folder, or an export folder holding one (``[NAME/]adapter``)."""
        is_adapter_dir, load_adapter = self.adapter_reader()
        path = Path(path)
        for folder in (path, path / "adapter", path / self.name / "adapter"):
            if is_adapter_dir(folder):
                load_adapter(model, folder)
                return True
        return False
