"""``AdapterPlugin``: what the adapter plugins (``lora``, ``blocklora``) share when bound to a run.

This module imports no torch, so a run's config is validated before anything heavy loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext


class AdapterPlugin(Plugin):
    """Base of the adapter plugins: config from a mapping, one adapter per model, export in the formats
    of ``config.export`` (each to ``out_dir/<format>/``) and ``init_from`` through the plugin's reader.

    A subclass sets ``name``, ``description``, ``config_class`` and defines ``apply`` (ending in
    ``check_export``), ``writers`` and ``adapter_reader``. Adapters may follow a quantize plugin (they train
    over its frozen quantized weights), never precede one.
    """

    kind = "adapter"
    conflicts = ("adapter",)  # a model takes one (Block-)LoRA adapter
    refuses_after = ("quantize",)  # quantize first, then fit adapters over the frozen quantized weights

    def __init__(self, config):
        cls = self.config_class
        super().__init__(config if isinstance(config, cls) else cls(**dict(config)))

    def check_pipeline(self, before: list) -> None:
        quantizers = [p.name for p in before if p.kind == "quantize"]
        if quantizers and "merged" in self.config.export:
            raise UserError(f"plugin.{self.name}.export has 'merged', but {quantizers[0]} leaves the base weights "
                            "quantized and an adapter over them cannot be merged; export the adapter instead "
                            f"(plugin.{self.name}.export={[f for f in self.config.export if f != 'merged']})")

    def check_export(self, model: "torch.nn.Module") -> "torch.nn.Module":
        """Refuse, before any training, a 'merged' export the adapted model cannot give (a quantized base)."""
        from blocktrain.trainer.adapters.surgery import lora_layers

        if "merged" in self.config.export:
            for layer in lora_layers(model).values():
                try:
                    layer.check_mergeable()
                except UserError as e:
                    raise UserError(f"plugin.{self.name}.export has 'merged': {e}") from None
        return model

    def writers(self) -> dict[str, Callable]:
        """Export format name -> ``writer(model, out_dir) -> paths``."""
        raise NotImplementedError

    def adapter_reader(self) -> tuple[Callable, Callable]:
        """(is_adapter_dir, load_adapter) for this plugin's own adapter format."""
        raise NotImplementedError

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
