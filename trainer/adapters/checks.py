"""Adapter hyper-parameter and setting checks shared by the library and the plugin configs; imports no torch."""
from __future__ import annotations

import math
import re

from blocktrain.trainer.errors import UserError

SCALINGS = ("rank", "sqrt_rank")
ENCODERS = ("vision", "text", "both")


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


def check_encoder(encoder: str, what: str = "LoRA") -> None:
    """Raise ``UserError`` unless ``encoder`` (the CLIP tower filter) is vision, text or both."""
    if encoder not in ENCODERS:
        raise UserError(f"unknown {what} encoder {encoder!r}. Valid values: {', '.join(ENCODERS)}")


def check_layers(layers, what: str = "LoRA") -> tuple[int, int] | None:
    """``layers`` as a ``(start, end)`` half-open encoder-layer range, or None for all layers."""
    if layers is None:
        return None
    items = None if isinstance(layers, (str, bytes)) else list(layers) if hasattr(layers, "__iter__") else None
    if items is None or len(items) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in items) \
            or not 0 <= items[0] < items[1]:
        raise UserError(f"{what} layers must be null (all layers) or [start, end) with 0 <= start < end, "
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


def check_export(formats, valid: tuple[str, ...], where: str) -> list[str]:
    """``formats`` as a list of strings, each one of ``valid``."""
    formats = [str(f) for f in formats]
    unknown = [f for f in formats if f not in valid]
    if unknown:
        raise UserError(f"unknown {where} format {unknown[0]!r}. Valid formats: {', '.join(valid)}")
    return formats
