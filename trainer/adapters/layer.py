"""``LoraLinear``: a frozen ``nn.Linear`` plus a trainable low-rank update (core: no Lightning, no Hydra).

What the update is comes from a *variant*, as in PEFT's ``tuners/lora/variants.py``: it makes the
layer's ``lora_A``/``lora_B``, computes the adapted output (fused with the base, or the update alone) and
the dense update a merge adds. ``LoraVariant`` is plain LoRA (Hu et al. 2021):
y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, merged W + s·B·A. Other variants subclass it (Block-LoRA's, in
``blocktrain.plugins.blocklora``). The same variants run over quantized bases (``quantized``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain import kernels
from blocktrain.trainer.adapters.checks import check_lora_args, lora_scaling


class LoraVariant:
    """Plain LoRA, and the base of every variant; one object serves all layers of an adapter.

    ``n_blocks`` is what the adapter files record (1 for plain LoRA); ``input_blocks`` the number of
    equal input chunks the fused kernel sums (the input width must be divisible by it).
    """

    n_blocks = 1
    input_blocks = 1

    def check(self, base: nn.Linear, rank: int) -> None:
        """Raise ``UserError`` if this variant cannot adapt ``base`` at ``rank``."""

    def shapes(self, layer: "LoraLinear") -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of ``lora_A`` and ``lora_B``: (r, in) and (out, r)."""
        return (layer.rank, layer.in_features), (layer.out_features, layer.rank)

    def init(self, layer: "LoraLinear") -> None:
        """Register ``lora_A`` Kaiming-uniform and ``lora_B`` = 0 (shaped by ``shapes``), so ΔW = 0 at start."""
        factory = layer.adapter_factory()
        shape_a, shape_b = self.shapes(layer)
        layer.lora_A = nn.Parameter(torch.empty(shape_a, **factory))
        layer.lora_B = nn.Parameter(torch.zeros(shape_b, **factory))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))

    def factors(self, layer: "LoraLinear") -> tuple[torch.Tensor, torch.Tensor]:
        """The down- and up-projection the update applies to ``adapter_input``: (A, B)."""
        return layer.lora_A, layer.lora_B

    def adapter_input(self, layer: "LoraLinear", x: torch.Tensor) -> torch.Tensor:
        """What the down-projection reads: dropout(x) (summed over ``input_blocks`` chunks where there are several)."""
        x = F.dropout(x, layer.dropout, layer.training)
        return x if self.input_blocks == 1 else x.unflatten(-1, (self.input_blocks, -1)).sum(-2)

    def forward(self, layer: "LoraLinear", x: torch.Tensor) -> torch.Tensor:
        """The unmerged layer's output over a dense base, base and update in one fused op."""
        a, b = self.factors(layer)
        return kernels.lora_linear(x, layer.weight, layer.bias, a, b, layer.scaling,
                                   n_blocks=self.input_blocks, dropout_p=layer.dropout, training=layer.training)

    def update(self, layer: "LoraLinear", x: torch.Tensor) -> torch.Tensor:
        """The update's term alone, s·ΔW·x (with dropout), for a base the fused op cannot read (a quantized one)."""
        a, b = self.factors(layer)
        return layer.scaling * F.linear(F.linear(self.adapter_input(layer, x), a), b)

    def delta_weight(self, layer: "LoraLinear") -> torch.Tensor:
        """s·B·A, the (out, in) update a merge adds to the weight, in float32."""
        return layer.scaling * (layer.lora_B.detach().float() @ layer.lora_A.detach().float())

    def extra_repr(self) -> str:
        """Appended to the layer's ``extra_repr``."""
        return ""


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` with a LoRA update of ``variant`` (plain LoRA by default); takes over the
    base layer's ``weight`` and ``bias``.

    The base parameters keep their names (``weight``, ``bias``), so the wrapped model's state dict is
    the base model's plus ``lora_A`` and ``lora_B``, shaped by the variant.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scaling: str = "rank",
                 variant: LoraVariant | None = None):
        super().__init__()
        self.variant = variant or LoraVariant()
        check_lora_args(rank, alpha, dropout, scaling)
        self.variant.check(base, rank)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.scaling_mode = scaling
        self.scaling = lora_scaling(alpha, rank, scaling)
        self.attach(base)
        self.variant.init(self)
        self.merged = False
        self.train(base.training)

    def attach(self, base: nn.Module) -> None:
        """Take over the base layer's ``weight`` and ``bias``, frozen."""
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def adapter_factory(self) -> dict:
        """Device and dtype of the adapter's parameters: the base weight's."""
        return dict(device=self.weight.device, dtype=self.weight.dtype)

    @property
    def n_blocks(self) -> int:
        return self.variant.n_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return self.variant.forward(self, x)

    def delta_weight(self) -> torch.Tensor:
        """s·ΔW: the (out, in) update ``merge`` adds to the weight, in float32."""
        return self.variant.delta_weight(self)

    def check_mergeable(self) -> None:
        """Raise ``UserError`` where the update cannot be folded into the base weight (a quantized base)."""

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·ΔW; the forward then skips the adapter. No-op if already merged."""
        self.check_mergeable()
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − s·ΔW, undoing ``merge`` (exact up to floating-point rounding). No-op if not merged."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def adapter_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling_mode}, n_blocks={self.n_blocks}, "
                f"dropout={self.dropout:g}, merged={self.merged}{self.variant.extra_repr()}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.adapter_repr()}")
