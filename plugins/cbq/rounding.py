"""LoRA-Rounding (CBQ §4): AdaRound's rounding variable V of one weight as a rank-r product V = A1·A2, its
initialisation, the annealed rounding regulariser, and hard rounding.

AdaRound rounds ŵ = s·(clamp(⌊w/s⌋ + h(V) + z, lo, hi) − z) with the rectified sigmoid h (``kernels.fake_quant``);
V0 = −log((ζ − γ)/(frac(w/s) − γ) − 1) makes h(V0) = frac(w/s), i.e. the soft start reproduces w inside the
grid's range and hardens (1[V0 ≥ 0] = 1[frac ≥ ½]) to round-to-nearest.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from blocktrain.kernels.fake_quant import GAMMA, ZETA, rectified_sigmoid
from blocktrain.trainer.compression.quant import expand_groups

__all__ = ["adaround_v0", "LoraRounding", "rounding_regularizer", "BetaSchedule", "hard_codes"]


def adaround_v0(weight: torch.Tensor, scale: torch.Tensor, zeta: float = ZETA, gamma: float = GAMMA,
                group_size: int | None = None) -> torch.Tensor:
    """AdaRound's initial V: h(V0) = frac(w/s) (BRECQ's ``init_alpha``), with ``scale`` [out, n_groups] over
    groups of ``group_size`` columns (``compression.quant.expand_groups``)."""
    t = weight.float() / expand_groups(scale.float(), weight.shape[1], group_size)
    frac = t - torch.floor(t)
    return -torch.log((zeta - gamma) / (frac - gamma) - 1)


class LoraRounding(nn.Module):
    """V = B + A1·A2 (A1 [out, r], A2 [r, in], B a frozen [out, in] base); ``rank=0`` keeps a full V [out, in]
    (AdaRound itself).

    ``init="svd"``: A1·A2 starts as the rank-r truncated SVD of V0 (A1 = U√Σ, A2 = √Σ Vᵀ), exactly V0 at full
    rank; ``init="zero"``: A1 = 0 and A2 random (a full V starts at 0).

    ``frozen_base=True`` (our reading, the default): B = V0 − A1·A2 at the start, so V starts exactly at V0
    (h(V0) = frac(w/s), hardening to round-to-nearest) whatever the rank and init, and the rank-r factors learn a
    low-rank change of AdaRound's V. ``False``: B = 0, V = A1·A2 alone (the literal reading); a rank r ≪ min(d, k)
    cannot hold V0's per-weight signs, so the start hardens to near-random rounding (≈ half the codes off RTN).
    """

    def __init__(self, v0: torch.Tensor, rank: int, init: str = "svd", generator: torch.Generator | None = None,
                 frozen_base: bool = True):
        super().__init__()
        out, cols = v0.shape
        if rank == 0:
            self.v_full = nn.Parameter(v0.clone() if init == "svd" else torch.zeros_like(v0))
        else:
            self.a1, self.a2 = (nn.Parameter(t.to(v0.device)) for t in self._factors(v0, rank, init, generator))
        base = v0 - self.forward() if frozen_base else None
        self.register_buffer("base", base.detach() if base is not None and bool(base.any()) else None)

    @staticmethod
    def _factors(v0: torch.Tensor, rank: int, init: str,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, cols = v0.shape
        r = min(rank, out, cols)
        if init == "svd":
            u, s, vh = torch.linalg.svd(v0.double(), full_matrices=False)
            root = s[:r].sqrt()
            a1, a2 = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
        elif init == "zero":
            a1 = torch.zeros(out, r)
            a2 = torch.randn(r, cols, generator=generator) / math.sqrt(cols)
        else:
            raise ValueError(f"init must be 'svd' or 'zero', got {init!r}")
        return a1, a2

    def forward(self) -> torch.Tensor:
        """V [out, in]."""
        v = self.v_full if hasattr(self, "v_full") else self.a1 @ self.a2
        return v if getattr(self, "base", None) is None else v + self.base


def rounding_regularizer(v: torch.Tensor, beta: float, zeta: float = ZETA, gamma: float = GAMMA) -> torch.Tensor:
    """Σ (1 − |2h(V) − 1|^β): zero when every h is 0 or 1 (AdaRound's form; CBQ's L_com)."""
    return (1 - (2 * rectified_sigmoid(v, zeta, gamma) - 1).abs().pow(beta)).sum()


class BetaSchedule:
    """β over ``steps`` optimiser steps: no regulariser during the first ``warmup`` fraction, then β decays
    linearly from ``start`` to ``end`` (BRECQ's ``LinearTempDecay`` with b_range (20, 2), warm-up 0.2)."""

    def __init__(self, steps: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        self.steps, self.start, self.end = steps, start, end
        self.warm = int(warmup * steps)

    def __call__(self, step: int) -> float | None:
        """β at optimiser step ``step`` (0-based), or None while warming up (no regulariser)."""
        if step < self.warm:
            return None
        progress = (step - self.warm) / max(1, self.steps - self.warm)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - progress)


def hard_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, v: torch.Tensor, lo: int,
               hi: int, group_size: int | None = None) -> torch.Tensor:
    """Integer codes with the rounding hardened: clamp(⌊w/s⌋ + 1[V ≥ 0] + z, lo, hi), as int32."""
    cols = weight.shape[1]
    t = weight.float() / expand_groups(scale.float(), cols, group_size)
    q = torch.floor(t) + (v >= 0).float() + expand_groups(zero.float(), cols, group_size)
    return q.clamp(lo, hi).to(torch.int32)
