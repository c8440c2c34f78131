"""Magnitude and Wanda pruning (Sun et al. 2023: score |W_ij|·‖X_j‖₂ over the calibration tokens); the scores
live in the shared ``compression.scores``."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from blocktrain.trainer.compression.masks import find_linear_names, mask_from_scores
from blocktrain.trainer.compression.replay import calibrate_layers, default_forward
from blocktrain.trainer.compression.scores import InputSquares, magnitude_scores, wanda_scores

__all__ = ["magnitude_prune", "wanda_prune"]


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
