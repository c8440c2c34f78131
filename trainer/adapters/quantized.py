"""LoRA (any variant) over a frozen quantized base layer, and the one table that picks the LoRA layer for a
base layer's type (core: no Lightning, no Hydra), as PEFT's ``tuners/lora/bnb.py``/``gptq.py`` dispatchers do.

Bases: ``nn.Linear`` (``LoraLinear``, the fused kernel), our ``QuantLinear`` (what RTN/GPTQ/CBQ leave in the
model) and bitsandbytes' ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (LLM.int8()), as transformers loads
them for ``model.quantization``. Over a quantized base the layer keeps it whole as ``base_layer`` (PEFT's
layout) and adds the variant's update: y = base(x) + s·ΔW·x. The adapter's parameters are float32 on the
base's device; the update is computed in their dtype and added in the base output's dtype. The base stays
as loaded (its codes never change); merging is refused, since W + s·ΔW does not lie on the base's grid.
"""
from __future__ import annotations

import torch
from torch import nn

from blocktrain.trainer.adapters.layer import LoraLinear, LoraVariant
from blocktrain.trainer.errors import UserError


class QuantizedLoraLinear(LoraLinear):
    """A LoRA update of ``variant`` over a frozen quantized layer, kept as the submodule ``base_layer``."""

    def attach(self, base: nn.Module) -> None:
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)

    def adapter_factory(self) -> dict:
        device = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()])).device
        return dict(device=device, dtype=torch.float32)

    @property
    def backend(self) -> str:
        """The base's kind, for messages."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        update = self.variant.update(self, x.to(self.lora_A.dtype))
        return result + update.to(result.dtype)

    def check_mergeable(self) -> None:
        raise UserError(f"LoRA over a quantized base ({self.backend}) cannot be merged: W + s·ΔW does not lie on "
                        "the base's quantization grid. Export the adapter (export: [adapter] or [peft]) and load "
                        "it over the same quantized base, or load the base unquantized to merge")

    def extra_repr(self) -> str:
        return f"{self.adapter_repr()}, base={self.backend}"


class QuantLinearLora(QuantizedLoraLinear):
    """Over our ``QuantLinear`` (integer codes + scale/zero; its input fake-quantized where it says so, the
    adapter's input not)."""

    @property
    def backend(self) -> str:
        return f"QuantLinear {self.base_layer.spec.bits}-bit"


class Bnb4bitLora(QuantizedLoraLinear):
    """Over bitsandbytes' ``Linear4bit`` (NF4 or FP4 codes, blockwise absmax, optionally double-quantized)."""

    @property
    def backend(self) -> str:
        return f"bitsandbytes {self.base_layer.weight.quant_type}"


class Bnb8bitLora(QuantizedLoraLinear):
    """Over bitsandbytes' ``Linear8bitLt`` (int8 rows with a per-row absmax; LLM.int8() outlier split)."""

    backend = "bitsandbytes int8"


# The LoRA layer over each kind of base, by the base's class (module.qualname); a subclass of a listed class
# (e.g. bitsandbytes' LinearNF4) takes its nearest listed ancestor's entry. Names, not classes, so
# bitsandbytes is imported only by models that hold its layers.
LAYERS: dict[str, type[LoraLinear]] = {
    "torch.nn.modules.linear.Linear": LoraLinear,
    "blocktrain.trainer.compression.quant.QuantLinear": QuantLinearLora,
    "bitsandbytes.nn.modules.Linear4bit": Bnb4bitLora,
    "bitsandbytes.nn.modules.Linear8bitLt": Bnb8bitLora,
}


def lora_class(module: nn.Module) -> type[LoraLinear] | None:
    """The LoRA layer class for ``module``'s type (``LAYERS``), or None where no adapter can go."""
    for cls in type(module).__mro__:
        found = LAYERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


def lora_layer(base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, scaling: str = "rank",
               variant: LoraVariant | None = None) -> LoraLinear:
    """The LoRA layer of ``variant`` (plain LoRA by default) over ``base``, of the class its type selects."""
    cls = lora_class(base)
    if cls is None:
        raise UserError(f"no LoRA layer for a {type(base).__name__} base (supported: "
                        f"{', '.join(n.rsplit('.', 1)[-1] for n in LAYERS)})")
    return cls(base, rank, alpha, dropout, scaling, variant)
