"""CFP's settings, torch-free: the plugin's config nests them and the core takes them as they are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from blocktrain.trainer.errors import UserError

__all__ = ["CFPSettings"]


@dataclass
class CFPSettings:
    """Coarse-to-fine pre-processing (see ``cfp.py``)."""

    enabled: bool = True  # false: no pre-processing
    variant: str = "paper"  # paper (quartiles 25/75, λ2·(var top + var bottom)) | msmodelslim (20/80 percentiles, var bottom, λ2 = 1, ± sides)
    lambda1: float = 1.5  # IQR fence: candidates above Q_hi + λ1·(Q_hi − Q_lo)
    lambda2: float = 1.0  # weight of the intra-set variance in the fine split (paper variant)
    clip_weights: bool = True  # clip each target weight's outliers to its largest non-outlier |w| (its quantizer's range)
    clip_check: bool = True  # clip a weight only where that lowers its input-weighted quantization error on the target grid; false: always
    scale_activations: Optional[bool] = None  # fold activation-outlier channel scales into norm + linears; null = only when activations are quantized below 8 bits
    exponent: float = 0.7  # an outlier channel's scale (max_c / max_non-outlier)^exponent

    def scales_activations(self, act) -> bool:
        """Whether CFP folds activation scales for activations quantized as ``act`` (None: not quantized). By default
        only below 8 bits: 8-bit per-token activations cost SmolLM2 almost nothing, and the scales then only make the
        weights harder (SmolLM2 W4A8: 73.6 with them, 68.6 without; at W6A6 they help: 63.3 with, 64.8 without)."""
        if self.scale_activations is not None:
            return self.scale_activations
        return act is not None and act.bits < 8

    def check(self, where: str) -> None:
        if self.variant not in ("paper", "msmodelslim"):
            raise UserError(f"{where}.variant must be paper or msmodelslim, got {self.variant!r}")
        if self.lambda1 < 0 or self.lambda2 < 0 or not 0 < self.exponent <= 1:
            raise UserError(f"{where}.lambda1 and {where}.lambda2 must be >= 0 and {where}.exponent in (0, 1], got "
                            f"{self.lambda1}, {self.lambda2}, {self.exponent}")
