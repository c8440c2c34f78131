"""The quantization baselines ``rtn`` and ``gptq``: the cores bound to a run through ``QuantizationPlugin``.

Each quantizes every ``nn.Linear`` but those named in ``exclude`` in its ``calibrate`` stage (layer by layer,
resumable) and leaves ``QuantLinear``s holding the integer codes; a prune plugin listed before keeps its zeros.
``evaluate`` reports bits/weight and the packed model size. This module imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from blocktrain.trainer.compression.quantizing import QuantConfig, QuantizationPlugin
from blocktrain.trainer.errors import UserError


@dataclass
class RTNConfig(QuantConfig):
    """``plugin.rtn``: round to nearest on each group's min–max range."""

    section = "plugin.rtn"
    clip_search: bool = False  # true: shrink each group's range (1.0 .. 0.5 of it) to the least squared weight error


@dataclass
class GPTQConfig(QuantConfig):
    """``plugin.gptq``: GPTQ column sweep with error feedback through the inverse input Hessian."""

    section = "plugin.gptq"
    blocksize: int = 128  # columns quantized together before their error is pushed to the later columns
    damp: float = 0.01  # Hessian dampening, as a fraction of its mean diagonal
    act_order: bool = False  # sweep columns in descending Hessian diagonal (the reference's --act-order)
    static_groups: bool = False  # group scales from the original weights before the sweep (else when it reaches them)

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize < 1:
            raise UserError(f"plugin.gptq.blocksize must be >= 1, got {self.blocksize}")
        if self.damp <= 0:
            raise UserError(f"plugin.gptq.damp must be > 0, got {self.damp}")


class RTNPlugin(QuantizationPlugin):
    """Round-to-nearest: no data needed, except to calibrate static activation ranges."""

    name = "rtn"
    description = "Round-to-nearest weight quantization (per channel or group; W/A bits) of every Linear"
    config_class = RTNConfig

    def quantize_layer(self, weight, stats, keep):
        from blocktrain.plugins.quantization.rtn import rtn_layer

        return rtn_layer(weight, self.spec, self.config.clip_search)


class GPTQPlugin(QuantizationPlugin):
    """GPTQ: each layer's Hessian from the calibration inputs of the model quantized so far."""

    name = "gptq"
    description = "GPTQ weight quantization (Hessian error feedback; act-order, groups) of every Linear"
    config_class = GPTQConfig
    _factors = None  # the shared inverse-Hessian factor of a layer group (set on first use)

    @property
    def needs_data(self) -> bool:
        return True

    def make_stats(self, module):
        from blocktrain.trainer.compression.hessian import HessianAccumulator

        return HessianAccumulator(module.in_features, device=module.weight.device)

    def quantize_layer(self, weight, stats, keep):
        from blocktrain.plugins.quantization.gptq import SharedFactor, gptq_layer

        c = self.config
        if self._factors is None:
            self._factors = SharedFactor(c.damp, c.act_order)
        return gptq_layer(weight, stats.H, self.spec, c.blocksize, c.damp, c.act_order, c.static_groups, keep,
                          self._factors(stats))
