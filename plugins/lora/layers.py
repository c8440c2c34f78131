"""The LoRA layer: a frozen ``nn.Linear`` plus a trainable low-rank update (core: no Lightning, no Hydra).

y = x·Wᵀ + b + s·((Σ_j dropout(x)_j)·Aᵀ)·Bᵀ, where x is split into ``n_blocks`` equal chunks x_j along
its last axis that share one down-projection A (Block-LoRA's Reading A; ``n_blocks=1`` is plain LoRA,
Hu et al. 2021). The merged weight is W + s·B·tile(A, n_blocks) along the input axis.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain import kernels
from blocktrain.plugins.lora.checks import check_lora_args, lora_scaling
from blocktrain.trainer.errors import UserError


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` with a LoRA update; takes over the base layer's ``weight`` and ``bias``.

    The base parameters keep their names (``weight``, ``bias``), so the wrapped model's state dict is
    the base model's plus ``lora_A`` (r, in/n_blocks) and ``lora_B`` (out, r).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scaling: str = "rank",
                 n_blocks: int = 1):
        super().__init__()
        check_lora_args(rank, alpha, dropout, scaling, n_blocks)
        if base.in_features % n_blocks:
            raise UserError(f"in_features {base.in_features} is not divisible by n_blocks {n_blocks}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout, self.n_blocks = rank, float(alpha), float(dropout), n_blocks
        self.scaling_mode = scaling
        self.scaling = lora_scaling(alpha, rank, scaling)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features // n_blocks, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return kernels.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                                   n_blocks=self.n_blocks, dropout_p=self.dropout, training=self.training)

    def delta_weight(self) -> torch.Tensor:
        """s·B·tile(A, n_blocks): the (out, in) update ``merge`` adds to the weight, in float32."""
        a = self.lora_A.detach().float().repeat(1, self.n_blocks)
        return self.scaling * (self.lora_B.detach().float() @ a)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·ΔW; the forward then skips the adapter. No-op if already merged."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − s·ΔW, undoing ``merge`` (exact up to floating-point rounding). No-op if not merged."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling_mode}, n_blocks={self.n_blocks}, "
                f"dropout={self.dropout:g}, merged={self.merged}")
