"""Putting Block-LoRA on a model (core: no Lightning, no Hydra): the adapter library's ``apply_lora`` with a
Block-LoRA variant. Targets are chosen by the library (names or a regex, a CLIP tower, a layer range);
merging, the adapter's state dict and parameter counts are the library's too.
"""
from __future__ import annotations

import logging
from typing import Sequence

from torch import nn

from blocktrain.plugins.blocklora.checks import check_block_lora_args
from blocktrain.plugins.blocklora.variants import BlockLoraVariant, block_lora_variant
from blocktrain.trainer.adapters.layer import LoraLinear
from blocktrain.trainer.adapters.surgery import apply_lora, lora_layers
from blocktrain.trainer.adapters.targeting import Targets, clip_towers, inside, is_open_clip

log = logging.getLogger(__name__)


def block_lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's Block-LoRA layers (``LoraLinear`` of a Block-LoRA variant) by qualified name."""
    return {n: m for n, m in lora_layers(model).items() if isinstance(m.variant, BlockLoraVariant)}


def apply_block_lora(model: nn.Module, targets: Targets = ("q_proj", "k_proj", "v_proj"), rank: int = 2,
                     n_blocks: int = 8, alpha: float = 1.0, scaling: str = "sqrt_rank", dropout: float = 0.25,
                     dropout_position: str = "before_sum", mode: str = "tile_input", encoder: str = "both",
                     layers: Sequence[int] | None = None, split_attention: bool | None = None,
                     modules_to_save: Targets = ()) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by Block-LoRA layers (in place) and freeze everything else
    but ``modules_to_save`` (any modules, chosen like ``targets``; e.g. a new classification head).

    ``mode``: ``tile_input`` (Reading A; needs n_blocks | in_features) or ``sum_rank`` (Reading B; needs
    n_blocks | rank). ``split_attention`` first turns every ``nn.MultiheadAttention`` into q/k/v/out_proj
    Linears so they can be targeted (None: only for open_clip models). Defaults are the spec's
    (CLIP-LoRA's r, α, dropout; n = 8). Returns ``model``.
    """
    check_block_lora_args(rank, alpha, dropout, scaling, n_blocks, mode, dropout_position)
    if split_attention is None:
        split_attention = is_open_clip(model)
    apply_lora(model, targets, rank, alpha, dropout, scaling, block_lora_variant(mode, n_blocks, dropout_position),
               encoder, layers, split_attention, modules_to_save, what="Block-LoRA")
    names = list(lora_layers(model))
    per_tower = ", ".join(f"{kind} {sum(inside(n, p) for n in names)}" for kind, p in clip_towers(model).items())
    log.info("Block-LoRA (%s, r=%d, n=%d): adapted %d Linear layers%s", mode, rank, n_blocks, len(names),
             f" ({per_tower})" if per_tower else "")
    return model
