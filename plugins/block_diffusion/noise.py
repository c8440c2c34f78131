"""Forward noising of block diffusion: noise levels per sequence or per block, and absorbing-state masking.

Noise levels t are the masking probabilities of the log-linear schedule (BD3-LM's ``LogLinearNoise``:
move chance = t, loss weight 1/t). ``sample_t`` draws them

- ``uniform``: on the clipped interval ``[eps_min, eps_max]``, antithetically stratified as in BD3-LM
  (``(u + arange(m)) / m``, one stratum per drawn value);
- ``beta``: SDAR-VL's PBNC, ``Beta(mu * C, (1 - mu) * C)`` clamped to the interval; ``pbnc_concentration``
  gives the linearly ramped C of a training step;

with one value per sequence (``sequence``, SDAR) or per block (``block``, BD3-LM's code and SDAR-VL's ABNS).
"""
from __future__ import annotations

import torch

def sample_t(batch: int, num_blocks: int, *, granularity: str = "block", schedule: str = "uniform",
             eps_min: float = 1e-3, eps_max: float = 1.0, antithetic: bool = True, beta_mu: float = 0.8,
             beta_c: float = 2.0, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels ``[batch, num_blocks]`` (equal along a row for ``granularity="sequence"``)."""
    cols = num_blocks if granularity == "block" else 1
    m = batch * cols
    if schedule == "uniform":
        u = torch.rand(m, device=device, generator=generator)
        if antithetic:
            u = (u + torch.arange(m, device=device)) / m
        t = eps_min + (eps_max - eps_min) * u
    else:
        beta = torch.distributions.Beta(torch.tensor(beta_mu * beta_c, device=device),
                                        torch.tensor((1 - beta_mu) * beta_c, device=device))
        t = beta.sample((m,)).clamp(eps_min, eps_max)
    return t.view(batch, cols).expand(batch, num_blocks)


def pbnc_concentration(step: int, ramp_steps: int, c_start: float, c_end: float) -> float:
    """PBNC's concentration C at ``step``: linear from ``c_start`` to ``c_end`` over ``ramp_steps``, then flat."""
    frac = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return c_start + (c_end - c_start) * frac


def eligible_positions(scored: torch.Tensor, block_size: int, ignore_bos: bool, keep_block_first: bool) -> torch.Tensor:
    """Positions that may be masked: scored ones, less position 0 (``ignore_bos``) and, with the one-position
    logit shift (NBDiff), the first token of every block, which the AR head predicts."""
    eligible = scored.clone()
    if ignore_bos:
        eligible[:, 0] = False
    if keep_block_first:
        eligible[:, ::block_size] = False
    return eligible


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, eligible: torch.Tensor, block_size: int, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, masked)``: each eligible token of block b replaced by ``mask_id`` with probability ``t[:, b]``."""
    p = t.repeat_interleave(block_size, dim=1)
    masked = (torch.rand(x0.shape, device=x0.device, generator=generator) < p) & eligible
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def clip_windows(eps: float, widths, delta: float) -> list[tuple[float, float]]:
    """BD3-LM's candidate noise intervals for the clip search: the full ``[eps, 1]`` and, for every width w,
    ``[a, a + w]`` with a = 0, delta, 2 delta, ... up to 1 - w (ends clamped to [eps, 1])."""
    windows = [(eps, 1.0)]
    for w in widths:
        for i in range(int(round((1 - w) / delta)) + 1):
            a = i * delta
            windows.append((round(max(a, eps), 6), round(min(max(a + w, eps), 1.0), 6)))
    return list(dict.fromkeys(windows))
