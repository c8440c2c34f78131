"""Block-LoRA argument checks shared by the core and the plugin config; imports no torch."""
from __future__ import annotations

import re

from blocktrain.plugins.lora.checks import check_lora_args
from blocktrain.trainer.errors import UserError

MODES = ("tile_input", "sum_rank")  # Reading A (default) | Reading B
DROPOUT_POSITIONS = ("before_sum", "after_sum")
ENCODERS = ("vision", "text", "both")


def check_block_lora_args(rank: int, alpha: float, dropout: float, scaling: str, n_blocks: int,
                          mode: str = "tile_input", dropout_position: str = "before_sum") -> None:
    """Raise ``UserError`` for hyper-parameters no Block-LoRA layer can take."""
    check_lora_args(rank, alpha, dropout, scaling, n_blocks)
    if mode not in MODES:
        raise UserError(f"unknown Block-LoRA mode {mode!r}. Valid values: {', '.join(MODES)} "
                        "(tile_input = Reading A, sum_rank = Reading B)")
    if dropout_position not in DROPOUT_POSITIONS:
        raise UserError(f"unknown Block-LoRA dropout_position {dropout_position!r}. "
                        f"Valid values: {', '.join(DROPOUT_POSITIONS)}")
    if mode == "sum_rank" and rank % n_blocks:
        raise UserError(f"Block-LoRA mode sum_rank splits the rank into n_blocks rank-blocks, so n_blocks must "
                        f"divide rank: rank={rank}, n_blocks={n_blocks} (e.g. rank=8, n_blocks=8), "
                        "or use mode tile_input")
    if mode == "sum_rank" and dropout_position == "after_sum":
        raise UserError("Block-LoRA dropout_position after_sum acts on the input chunk-sum of mode tile_input; "
                        "mode sum_rank has no input chunk-sum (its dropout is on the input): use before_sum")


def check_encoder(encoder: str) -> None:
    """Raise ``UserError`` unless ``encoder`` is vision, text or both."""
    if encoder not in ENCODERS:
        raise UserError(f"unknown Block-LoRA encoder {encoder!r}. Valid values: {', '.join(ENCODERS)}")


def check_layers(layers) -> tuple[int, int] | None:
    """``layers`` as a ``(start, end)`` half-open encoder-layer range, or None for all layers."""
    if layers is None:
        return None
    items = None if isinstance(layers, (str, bytes)) else list(layers) if hasattr(layers, "__iter__") else None
    if items is None or len(items) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in items) \
            or not 0 <= items[0] < items[1]:
        raise UserError(f"Block-LoRA layers must be null (all layers) or [start, end) with 0 <= start < end, "
                        f"got {layers!r}")
    return items[0], items[1]


def check_targets(targets, where: str = "targets"):
    """``targets`` as a regex string (checked to compile) or a non-empty list of module names."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise UserError(f"{where} {targets!r} is not a valid regex: {exc}") from None
        return targets
    if isinstance(targets, (int, float, bool)) or targets is None or not list(targets):
        raise UserError(f"{where} must be a non-empty list of module names or a regex string, got {targets!r}")
    return [str(t) for t in targets]
