"""Mask utilities shared by the pruning methods: targets, score → keep-mask rules, applying, reporting.

A mask is a bool tensor shaped like the weight, True = keep. Patterns:

- ``"layer"``: keep the round(numel·density) highest scores of the layer;
- ``"row"``: keep the same number of highest scores in every output row, round(numel·density) // rows
  (the iCBS ``*_per_output`` rule; equals round(cols·density) whenever cols·density is whole);
- ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``): keep the N highest of every M consecutive inputs of a row.

Ties are broken by index (stable sort), so masks are deterministic.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "find_linear_names", "parse_pattern", "keep_count", "row_keep_count", "ascending_order",
    "mask_from_scores", "apply_masks", "sparsity_report",
]


def find_linear_names(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Names of every ``nn.Linear`` in registration order, except those whose last name part is in ``exclude``."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude]


def parse_pattern(pattern: str) -> tuple[str, tuple[int, int] | None]:
    """``"layer"`` / ``"row"`` / ``"N:M"`` → (kind, (N, M) or None)."""
    if pattern in ("layer", "row"):
        return pattern, None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'layer', 'row' or 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return "nm", (n, m)


def keep_count(numel: int, density: float) -> int:
    """Weights a layer keeps at ``density``: round(numel·density)."""
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1), got {density}")
    return round(numel * density)


def row_keep_count(rows: int, cols: int, density: float) -> int:
    """Weights each output row keeps under the ``"row"`` pattern."""
    return keep_count(rows * cols, density) // rows


def ascending_order(scores: torch.Tensor) -> torch.Tensor:
    """Stable ascending argsort along the last dimension."""
    return torch.argsort(scores, dim=-1, stable=True)


def mask_from_scores(scores: torch.Tensor, density: float | None = None, pattern: str = "layer") -> torch.Tensor:
    """Keep-mask (True = keep) with the highest ``scores`` kept under ``pattern`` (density unused for N:M)."""
    kind, nm = parse_pattern(pattern)
    if kind == "nm":
        n, m = nm
        rows, cols = scores.shape
        if cols % m:
            raise ValueError(f"N:M pattern {pattern!r} needs the input size ({cols}) to be a multiple of {m}")
        groups = scores.reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, ascending_order(groups)[..., m - n:], True)
        return keep.reshape(rows, cols)
    flat = scores.reshape(1, -1) if kind == "layer" else scores
    n_keep = keep_count(scores.numel(), density) if kind == "layer" else row_keep_count(*scores.shape, density)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(-1, ascending_order(flat)[:, flat.shape[1] - n_keep:], True)
    return keep.reshape(scores.shape)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights outside each keep-mask, in place (real zeros)."""
    for name, keep in masks.items():
        weight = model.get_submodule(name).weight
        weight.masked_fill_(~keep.to(weight.device), 0)


@torch.no_grad()
def sparsity_report(model: nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Density (fraction of non-zero weights) of each named layer (default: every Linear but lm_head)."""
    weights = {n: model.get_submodule(n).weight for n in (find_linear_names(model) if names is None else names)}
    return {n: float(w.count_nonzero()) / w.numel() for n, w in weights.items()}
