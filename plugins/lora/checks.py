"""LoRA hyper-parameter checks shared by the core and the plugin config; imports no torch."""
from __future__ import annotations

import math

from blocktrain.trainer.errors import UserError

SCALINGS = ("rank", "sqrt_rank")


def lora_scaling(alpha: float, rank: int, scaling: str = "rank") -> float:
    """The factor s of the update: α/r (``"rank"``, Hu et al.) or α/√r (``"sqrt_rank"``, rsLoRA)."""
    check_lora_args(rank, alpha, 0.0, scaling)
    return alpha / rank if scaling == "rank" else alpha / math.sqrt(rank)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_lora_args(rank: int, alpha: float, dropout: float, scaling: str, n_blocks: int = 1) -> None:
    """Raise ``UserError`` for a rank, alpha, dropout, scaling or n_blocks no LoRA layer can take."""
    if not _is_int(rank) or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not (_is_int(alpha) or isinstance(alpha, float)) or not alpha > 0:
        raise UserError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not (_is_int(dropout) or isinstance(dropout, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}")
    if scaling not in SCALINGS:
        raise UserError(f"unknown LoRA scaling {scaling!r}. Valid values: {', '.join(SCALINGS)}")
    if not _is_int(n_blocks) or n_blocks < 1:
        raise UserError(f"LoRA n_blocks must be a positive integer, got {n_blocks!r}")
