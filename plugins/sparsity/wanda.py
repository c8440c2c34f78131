"""Magnitude and Wanda pruning (Sun et al. 2023: score |W_ij|·‖X_j‖₂ over the calibration tokens)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .calibration import calibrate_layers, default_forward
from .masks import find_linear_names, mask_from_scores

__all__ = ["InputSquares", "magnitude_scores", "wanda_scores", "input_square_sums", "magnitude_prune", "wanda_prune"]


class InputSquares:
    """Running Σ_tokens x_j² per input feature j (fp32)."""

    def __init__(self):
        self.sums: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        s = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)
        self.sums = s if self.sums is None else self.sums + s


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in fp32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, square_sums: torch.Tensor) -> torch.Tensor:
    """|W_ij|·√(Σ_tokens x_j²) in fp32."""
    return magnitude_scores(weight) * square_sums.to(weight.device).float().sqrt()[None, :]


def input_square_sums(model: nn.Module, names: list[str], batches: Iterable,
                      forward: Callable = default_forward) -> dict[str, torch.Tensor]:
    """Σ_tokens x² per input feature of each named layer, in one pass over the unpruned model."""
    out: dict[str, torch.Tensor] = {}
    calibrate_layers(model, names, batches, forward, lambda m: InputSquares(),
                     lambda name, m, st: out.__setitem__(name, st.sums), sequential=False)
    return out


@torch.no_grad()
def magnitude_prune(model: nn.Module, density: float = 0.5, names: list[str] | None = None,
                    pattern: str = "layer") -> dict[str, torch.Tensor]:
    """Keep the largest |W| of each layer under ``pattern``; zero the rest in place. Returns the keep-masks."""
    masks = {}
    for name in find_linear_names(model) if names is None else names:
        weight = model.get_submodule(name).weight
        masks[name] = mask_from_scores(magnitude_scores(weight), density, pattern)
        weight.masked_fill_(~masks[name], 0)
    return masks


def wanda_prune(model: nn.Module, batches: Iterable, forward: Callable = default_forward, density: float = 0.5,
                names: list[str] | None = None, pattern: str = "row",
                sequential: bool = True) -> dict[str, torch.Tensor]:
    """Wanda: keep the highest |W|·‖X‖₂ under ``pattern``, layer by layer (inputs from the model pruned so far
    when ``sequential``). Zeroes the weights in place and returns the keep-masks."""
    masks: dict[str, torch.Tensor] = {}

    def finish(name: str, module: nn.Module, stats: InputSquares) -> None:
        masks[name] = mask_from_scores(wanda_scores(module.weight, stats.sums), density, pattern)
        with torch.no_grad():
            module.weight.masked_fill_(~masks[name], 0)

    names = find_linear_names(model) if names is None else names
    calibrate_layers(model, names, batches, forward, lambda m: InputSquares(), finish, sequential)
    return masks
