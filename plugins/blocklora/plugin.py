"""The ``blocklora`` plugin: binds Block-LoRA (the adapter library with this package's variants) to a run
(surgery, export, ``init_from``).

This module imports no torch, so a run's config is validated before anything heavy loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from blocktrain.plugins.blocklora.checks import check_block_lora_args
from blocktrain.trainer.adapters.checks import check_encoder, check_export, check_layers, check_targets
from blocktrain.trainer.adapters.plugin import AdapterPlugin
from blocktrain.trainer.plugin import PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext

EXPORT_FORMATS = ("adapter", "merged")  # each is written to out_dir/<format>/


@dataclass
class BlockLoraConfig(PluginConfig):
    """``plugin.blocklora``: Block-LoRA's hyper-parameters, where it goes and what the export stage writes."""

    rank: int = 2
    n_blocks: int = 8
    alpha: float = 1.0
    scaling: str = "sqrt_rank"  # sqrt_rank: alpha/sqrt(r) (CLIP-LoRA); rank: alpha/r
    dropout: float = 0.25  # on the adapter input only
    dropout_position: str = "before_sum"  # before_sum (spec) | after_sum (n x smaller mask, other regulariser)
    mode: str = "tile_input"  # tile_input = Reading A | sum_rank = Reading B
    targets: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])  # names (suffix match) or a regex
    encoder: str = "both"  # vision | text | both (CLIP models; ignored otherwise)
    layers: Optional[list[int]] = None  # [start, end) encoder-layer range; null = all
    modules_to_save: list[str] = field(default_factory=list)  # kept fully trainable and exported, e.g. [classifier]
    export: list[str] = field(default_factory=lambda: ["adapter", "merged"])

    def __post_init__(self):
        check_block_lora_args(self.rank, self.alpha, self.dropout, self.scaling, self.n_blocks, self.mode,
                              self.dropout_position)
        check_encoder(self.encoder, "Block-LoRA")
        span = check_layers(self.layers, "Block-LoRA")
        self.layers = None if span is None else list(span)
        self.targets = check_targets(self.targets, "plugin.blocklora.targets")
        self.modules_to_save = [str(m) for m in self.modules_to_save]
        self.export = check_export(self.export, EXPORT_FORMATS, "plugin.blocklora.export")


class BlockLoraPlugin(AdapterPlugin):
    """Block-LoRA on q/k/v of CLIP's towers (or any Linear layers); exports our adapter and the merged model."""

    name = "blocklora"
    description = "Block-LoRA (One Head Eight Arms): LoRA with one down-projection shared by n input blocks"
    config_class = BlockLoraConfig

    def apply(self, model: "torch.nn.Module", run: "RunContext") -> "torch.nn.Module":
        from blocktrain.plugins.blocklora.surgery import apply_block_lora

        c = self.config
        model = apply_block_lora(model, targets=c.targets, rank=c.rank, n_blocks=c.n_blocks, alpha=c.alpha,
                                 scaling=c.scaling, dropout=c.dropout, dropout_position=c.dropout_position,
                                 mode=c.mode, encoder=c.encoder, layers=c.layers, modules_to_save=c.modules_to_save)
        return self.check_export(model)

    def writers(self) -> dict[str, Callable]:
        from blocktrain.plugins.blocklora.export import save_block_adapter
        from blocktrain.trainer.adapters.export import save_merged

        return {"adapter": save_block_adapter, "merged": save_merged}

    def adapter_reader(self) -> tuple[Callable, Callable]:
        from blocktrain.plugins.blocklora.export import is_block_adapter_dir, load_block_adapter

        return is_block_adapter_dir, load_block_adapter
