"""Block-LoRA's two readings as variants of the adapter library's ``LoraLinear`` (core: no Lightning, no Hydra).

Notation (``nn.Linear`` convention): W0 (out, in), y = W0·x + b + s·ΔW·x.

- ``TileInputVariant`` — Reading A (``tile_input``): x is cut into n chunks x_j of in/n that share one
  down-projection A_s (r, in/n): ΔW·x = B·A_s·Σ_j x_j, ΔW = B·tile(A_s, n) (the fused
  ``blocktrain.kernels.lora_linear`` op with ``n_blocks``); ``dropout_position="after_sum"`` drops the
  chunk-sum (in/n columns) instead of the input (in columns).
- ``SumRankVariant`` — Reading B (``sum_rank``): n rank-blocks B_i (out, r/n) share one A_s (r/n, in):
  ΔW = Σ_i B_i·A_s = (Σ_i B_i)·A_s.

Both have the same number of trainable parameters, out·r + r·in/n, and ``n_blocks=1`` is plain LoRA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.plugins.blocklora.checks import check_block_lora_args, check_sum_rank
from blocktrain.trainer.adapters.layer import LoraLinear, LoraVariant
from blocktrain.trainer.adapters.quantized import lora_layer
from blocktrain.trainer.errors import UserError


class BlockLoraVariant(LoraVariant):
    """What both readings share: ``n_blocks`` blocks, a ``mode`` and a ``dropout_position``."""

    mode = ""

    def __init__(self, n_blocks: int, dropout_position: str = "before_sum"):
        self.n_blocks, self.dropout_position = n_blocks, dropout_position

    def extra_repr(self) -> str:
        return f", mode={self.mode}, dropout_position={self.dropout_position}"


class TileInputVariant(BlockLoraVariant):
    """Reading A: ``lora_A`` is A_s (r, in/n), shared by the n input chunks; ``lora_B`` is B (out, r).

    ``before_sum`` (the spec's default) drops the adapter input, inside the fused op; ``after_sum`` drops
    the chunk-sum Σ_j x_j, so its mask is n times smaller (a different regulariser).
    """

    mode = "tile_input"

    def __init__(self, n_blocks: int, dropout_position: str = "before_sum"):
        super().__init__(n_blocks, dropout_position)
        self.input_blocks = n_blocks

    def check(self, base: nn.Linear, rank: int) -> None:
        if base.in_features % self.n_blocks:
            raise UserError(f"in_features {base.in_features} is not divisible by n_blocks {self.n_blocks}")

    def shapes(self, layer: LoraLinear) -> tuple[tuple[int, int], tuple[int, int]]:
        return (layer.rank, layer.in_features // self.n_blocks), (layer.out_features, layer.rank)

    def adapter_input(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_position == "before_sum":
            return super().adapter_input(layer, x)
        return F.dropout(x.unflatten(-1, (self.n_blocks, -1)).sum(-2), layer.dropout, layer.training)

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_position == "before_sum" or not (layer.training and layer.dropout > 0):
            return super().forward(layer, x)  # without dropout both positions are the same function
        return F.linear(x, layer.weight, layer.bias) + self.update(layer, x)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        """s·B·tile(A_s, n), (out, in), in float32."""
        a = layer.lora_A.detach().float().repeat(1, self.n_blocks)
        return layer.scaling * (layer.lora_B.detach().float() @ a)


class SumRankVariant(BlockLoraVariant):
    """Reading B: ``lora_A`` is the shared A_s (r/n, in), ``lora_B`` (out, r) holds [B_1 … B_n] side by side.

    The layer's ``rank`` is the nominal r (the scaling is α/r or α/√r of it); the update has rank at most
    r/n. Dropout acts on the adapter input.
    """

    mode = "sum_rank"

    def check(self, base: nn.Linear, rank: int) -> None:
        check_sum_rank(rank, self.n_blocks)

    def shapes(self, layer: LoraLinear) -> tuple[tuple[int, int], tuple[int, int]]:
        return (layer.rank // self.n_blocks, layer.in_features), (layer.out_features, layer.rank)

    def summed_B(self, layer: LoraLinear) -> torch.Tensor:
        """Σ_i B_i, (out, r/n)."""
        return layer.lora_B.unflatten(1, (self.n_blocks, -1)).sum(1)

    def factors(self, layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_A, self.summed_B(layer)

    def delta_weight(self, layer: LoraLinear) -> torch.Tensor:
        """s·(Σ_i B_i)·A_s, (out, in), in float32."""
        return layer.scaling * (self.summed_B(layer).detach().float() @ layer.lora_A.detach().float())


def block_lora_variant(mode: str, n_blocks: int, dropout_position: str = "before_sum") -> BlockLoraVariant:
    """The variant of ``mode`` (``tile_input`` or ``sum_rank``)."""
    if mode == "sum_rank":
        return SumRankVariant(n_blocks, dropout_position)
    return TileInputVariant(n_blocks, dropout_position)


def block_lora_layer(base: nn.Module, mode: str, rank: int, alpha: float, dropout: float = 0.0,
                     scaling: str = "rank", n_blocks: int = 1, dropout_position: str = "before_sum") -> LoraLinear:
    """The LoRA layer of the Block-LoRA variant of ``mode`` around ``base`` (an ``nn.Linear`` or a quantized one)."""
    check_block_lora_args(rank, alpha, dropout, scaling, n_blocks, mode, dropout_position)
    return lora_layer(base, rank, alpha, dropout, scaling, block_lora_variant(mode, n_blocks, dropout_position))
