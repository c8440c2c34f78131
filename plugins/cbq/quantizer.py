"""``CBQLinear``: a Linear under CBQ's learnable quantizers while its window is optimised.

Weights: per output channel or group, asymmetric (or symmetric) on the shared grid, with a learnable step size
S^W = s0·exp(θ) (θ starts at 0, so weight decay pulls towards the min-max start) and LoRA-Rounding's soft
rounding; activations: per-token dynamic fake quantization (the default) or one learnable static step
S^X = s0·exp(θ_X) from the calibration range. ``clip`` (CFP's weight-outlier bound, a number or one per input
column): the start step s0 comes from the weight clamped to ±clip, so the outliers saturate on the grid while ``fp`` mode keeps them. ``mode``: ``"fp"`` (the full-precision layer, T_fp),
``"soft"`` (soft rounding, what is trained) or ``"hard"`` (rounding hardened, 1[V ≥ 0]). ``entry()`` is what the final
``QuantLinear`` holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.kernels.fake_quant import fake_quant
from blocktrain.plugins.cbq.rounding import LoraRounding, adaround_v0, hard_codes
from blocktrain.trainer.compression.quant import (ActQuantSpec, QuantSpec, expand_groups, fake_quantize_tokens,
                                                  minmax_qparams, qrange)

__all__ = ["CBQLinear"]

_MIN_SCALE = 1e-10


class CBQLinear(nn.Module):
    """``linear`` (whose weight is kept, not copied) with learnable weight/activation quantizers."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, act: ActQuantSpec | None, rank: int, init: str = "svd",
                 keep_zeros: bool = False, generator: torch.Generator | None = None, frozen_base: bool = True,
                 clip: float | torch.Tensor | None = None):
        super().__init__()
        self.spec, self.act = spec, act
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        scale, zero = minmax_qparams(self.weight if clip is None else self.weight.clamp(-clip, clip), spec)
        self.register_buffer("scale0", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("keep", (self.weight != 0) if keep_zeros else None)
        self.log_gain = nn.Parameter(torch.zeros_like(scale))
        v0 = adaround_v0(self.weight, scale, group_size=spec.group_size)
        self.rounding = LoraRounding(v0, rank, init, generator, frozen_base)
        self.act_log_gain = None
        if act is not None and not act.dynamic:
            self.register_buffer("act_scale0", torch.ones(1, 1, device=scale.device))
            self.register_buffer("act_zero", torch.zeros(1, 1, device=scale.device))
            self.act_log_gain = nn.Parameter(torch.zeros(1, 1, device=scale.device))
            self.act_range: list[float] | None = None  # min/max of the inputs while observing
        self.mode = "soft"

    # -- quantizers ---------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        return (self.scale0 * self.log_gain.exp()).clamp_min(_MIN_SCALE)

    def act_scale(self) -> torch.Tensor:
        return (self.act_scale0 * self.act_log_gain.exp()).clamp_min(_MIN_SCALE)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """[out, n_groups] → [out, in] on the spec's groups."""
        return expand_groups(t, self.weight.shape[1], self.spec.group_size)

    def quantized_weight(self) -> torch.Tensor:
        lo, hi = qrange(self.spec)
        if self.mode == "hard":
            with torch.no_grad():
                codes = self.codes()
            w = self._expand(self.scale()) * (codes - self._expand(self.zero))  # the learnable step still trains
        else:  # ŵ = s·(clamp(⌊w/s0⌋ + h(V) + z) − z): w·s/s0 keeps the floor on the start grid, gradients exact
            s = self.scale()
            w = fake_quant(self.weight.float() * self._expand(s / self.scale0), s, self.zero, lo, hi,
                           v=self.rounding(), group_size=self.spec.group_size)
            if self.keep is not None:
                w = w * self.keep
        return w

    def codes(self) -> torch.Tensor:
        """The hard-rounded integer codes ⌊w/s0⌋ + 1[V ≥ 0] (pruned zeros at the zero point)."""
        lo, hi = qrange(self.spec)
        codes = hard_codes(self.weight, self.scale0, self.zero, self.rounding(), lo, hi, self.spec.group_size)
        if self.keep is not None:
            codes = torch.where(self.keep, codes, self._expand(self.zero).to(codes.dtype))
        return codes

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return x
        if self.act.dynamic:
            return fake_quantize_tokens(x, self.act)
        flat = x.reshape(-1, x.shape[-1])
        if self.act_range is not None:  # observing: record the range, pass the input through
            self.act_range = [min(self.act_range[0], float(flat.min())), max(self.act_range[1], float(flat.max()))]
            return x
        lo, hi = qrange(self.act.grid)
        return fake_quant(flat, self.act_scale(), self.act_zero, lo, hi).reshape(x.shape)

    @torch.no_grad()
    def set_act_range(self, lo: float, hi: float) -> None:
        """The static activation step and zero point from a calibration range (min-max, θ_X reset to 0)."""
        scale, zero = minmax_qparams(torch.tensor([[lo, hi]]), self.act.grid)
        self.act_scale0.copy_(scale)
        self.act_zero.copy_(zero)
        self.act_log_gain.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp":
            return F.linear(x, self.weight, self.bias)
        w = self.quantized_weight()
        return F.linear(self.quantize_input(x), w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # -- results --------------------------------------------------------------------------------
    @torch.no_grad()
    def entry(self) -> dict[str, torch.Tensor]:
        """What the final layer holds: {"codes", "scale", "zero"[, "act_scale", "act_zero"]} on the CPU."""
        out = {"codes": self.codes().cpu(), "scale": self.scale().float().cpu(), "zero": self.zero.float().cpu()}
        if self.act_log_gain is not None:
            out.update(act_scale=self.act_scale().float().cpu(), act_zero=self.act_zero.float().cpu())
        return out

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, {self.spec}, act={self.act}, mode={self.mode}"
