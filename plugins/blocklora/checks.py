"""Block-LoRA argument checks shared by the core and the plugin config; imports no torch."""
from __future__ import annotations

from blocktrain.trainer.adapters.checks import check_lora_args
from blocktrain.trainer.errors import UserError

MODES = ("tile_input", "sum_rank")  # Reading A (default) | Reading B
DROPOUT_POSITIONS = ("before_sum", "after_sum")


def check_sum_rank(rank: int, n_blocks: int) -> None:
    """Mode sum_rank splits the rank into n_blocks rank-blocks: n_blocks must divide rank."""
    if rank % n_blocks:
        raise UserError(f"Block-LoRA mode sum_rank splits the rank into n_blocks rank-blocks, so n_blocks must "
                        f"divide rank: rank={rank}, n_blocks={n_blocks} (e.g. rank=8, n_blocks=8), "
                        "or use mode tile_input")


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
    if mode == "sum_rank":
        check_sum_rank(rank, n_blocks)
    if mode == "sum_rank" and dropout_position == "after_sum":
        raise UserError("Block-LoRA dropout_position after_sum acts on the input chunk-sum of mode tile_input; "
                        "mode sum_rank has no input chunk-sum (its dropout is on the input): use before_sum")
