"""Weight saliency scores and the layer-input statistics behind them: |W| (magnitude) and |W|·‖X‖₂ (Wanda,
Sun et al. 2023), used by the pruning methods and as iCBS's starting mask."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from blocktrain.trainer.compression.replay import calibrate_layers, default_forward

__all__ = ["InputSquares", "magnitude_scores", "wanda_scores", "input_square_sums"]


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
