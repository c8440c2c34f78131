"""Block-LoRA layers (core: no Lightning, no Hydra), both built on the ``lora`` plugin's ``LoraLinear``.

Notation (``nn.Linear`` convention): W0 (out, in), y = W0·x + b + s·ΔW·x.

- ``BlockLoraLinear`` — Reading A (``tile_input``): x is cut into n chunks x_j of in/n that share one
  down-projection A_s (r, in/n): ΔW·x = B·A_s·Σ_j x_j, ΔW = B·tile(A_s, n). This is ``LoraLinear`` with
  ``n_blocks`` (the fused ``blocktrain.kernels.lora_linear`` op); ``dropout_position="after_sum"`` drops
  the chunk-sum (in/n columns) instead of the input (in columns).
- ``SumRankLoraLinear`` — Reading B (``sum_rank``): n rank-blocks B_i (out, r/n) share one A_s (r/n, in):
  ΔW = Σ_i B_i·A_s = (Σ_i B_i)·A_s.

Both have the same number of trainable parameters, out·r + r·in/n, and ``n_blocks=1`` is plain LoRA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain import kernels
from blocktrain.plugins.blocklora.checks import check_block_lora_args
from blocktrain.plugins.lora.checks import lora_scaling
from blocktrain.plugins.lora.layers import LoraLinear


class BlockLoraLinear(LoraLinear):
    """Reading A: ``LoraLinear`` with ``n_blocks`` input chunks sharing A_s, and a dropout position.

    ``before_sum`` (the spec's default) drops the adapter input, inside the fused op; ``after_sum`` drops
    the chunk-sum Σ_j x_j, so its mask is n times smaller (a different regulariser).
    """

    mode = "tile_input"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scaling: str = "rank",
                 n_blocks: int = 1, dropout_position: str = "before_sum"):
        check_block_lora_args(rank, alpha, dropout, scaling, n_blocks, self.mode, dropout_position)
        super().__init__(base, rank, alpha, dropout, scaling, n_blocks)
        self.dropout_position = dropout_position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_position == "before_sum" or self.merged or not (self.training and self.dropout > 0):
            return super().forward(x)  # without dropout both positions are the same function
        xs = x.unflatten(-1, (self.n_blocks, -1)).sum(-2)
        update = F.linear(F.linear(F.dropout(xs, self.dropout, training=True), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, dropout_position={self.dropout_position}"


class SumRankLoraLinear(LoraLinear):
    """Reading B: ``lora_A`` is the shared A_s (r/n, in), ``lora_B`` (out, r) holds [B_1 … B_n] side by side.

    ``rank`` is the nominal r (the scaling is α/r or α/√r of it); the update has rank at most r/n.
    Dropout acts on the adapter input.
    """

    mode = "sum_rank"
    dropout_position = "before_sum"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scaling: str = "rank",
                 n_blocks: int = 1):
        check_block_lora_args(rank, alpha, dropout, scaling, n_blocks, self.mode)
        super().__init__(base, rank // n_blocks, alpha, dropout, scaling)  # lora_A = A_s, Kaiming-uniform
        self.rank, self.n_blocks = rank, n_blocks
        self.scaling = lora_scaling(alpha, rank, scaling)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=self.lora_A.dtype,
                                               device=self.lora_A.device))

    def summed_B(self) -> torch.Tensor:
        """Σ_i B_i, (out, r/n)."""
        return self.lora_B.unflatten(1, (self.n_blocks, -1)).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return kernels.lora_linear(x, self.weight, self.bias, self.lora_A, self.summed_B(), self.scaling,
                                   n_blocks=1, dropout_p=self.dropout, training=self.training)

    def delta_weight(self) -> torch.Tensor:
        """s·(Σ_i B_i)·A_s: the (out, in) update ``merge`` adds to the weight, in float32."""
        return self.scaling * (self.summed_B().detach().float() @ self.lora_A.detach().float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}"


def block_lora_layer(base: nn.Linear, mode: str, rank: int, alpha: float, dropout: float = 0.0,
                     scaling: str = "rank", n_blocks: int = 1, dropout_position: str = "before_sum") -> LoraLinear:
    """The Block-LoRA layer of ``mode`` (``tile_input`` or ``sum_rank``) around ``base``."""
    check_block_lora_args(rank, alpha, dropout, scaling, n_blocks, mode, dropout_position)
    if mode == "sum_rank":
        return SumRankLoraLinear(base, rank, alpha, dropout, scaling, n_blocks)
    return BlockLoraLinear(base, rank, alpha, dropout, scaling, n_blocks, dropout_position)
