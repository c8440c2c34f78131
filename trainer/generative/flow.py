"""Flow matching on the linear path and its samplers (shared by the ``flow_matching`` and ``bfm`` plugins).

Time convention (SiT/BFM): x_t = (1 − t)·x + t·ε, **t = 1 is noise, t = 0 is data**, target v* = ε − x.
Samplers integrate from t = 1 to t = 0 over ``segments`` equal pieces of [0, 1] (one for a single network),
``steps`` per segment: Euler or Heun ODE, or Euler–Maruyama SDE with diffusion w(t) = 2t, each with
classifier-free guidance on a guidance interval. A velocity is a callable ``(x, t, y, segment, first)``
(``first``: the first evaluation of a segment, where BFM's FRN sampler runs the full trunk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from blocktrain.trainer.errors import UserError

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, bool], torch.Tensor]


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x + t·ε."""
    t = _bcast(t, x)
    return (1 - t) * x + t * eps


def fm_loss(velocity: Callable, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean ‖v(x_t, t, y) − (ε − x)‖² over every element (SiT's loss)."""
    return F.mse_loss(velocity(interpolate(x, eps, t), t, y), eps - x)


def segment_bounds(segments: int) -> torch.Tensor:
    """σ = linspace(1, 0, K+1): segment k covers t ∈ [σ_{k+1}, σ_k], k = 0 the noisiest."""
    return torch.linspace(1, 0, segments + 1, dtype=torch.float64)


@dataclass(frozen=True)
class Step:
    segment: int
    t: float
    t_next: float
    first: bool  # first step of its segment
    stochastic: bool = False


def time_steps(segments: int, steps: int, method: str = "euler", sde_t_end: float = 0.04,
               repeat_last: bool = False) -> list[Step]:
    """The steps from t = 1 to t = 0, ``steps`` per segment. SDE: the last segment stops its stochastic steps at
    ``sde_t_end`` and ends with one deterministic step to 0 (REPA); ``repeat_last`` adds the official BFM
    code's second copy of that step (a bug, kept only for a faithful comparison)."""
    sigma = segment_bounds(segments).tolist()
    out: list[Step] = []
    for k in range(segments):
        sde_tail = method == "sde" and k == segments - 1
        if sde_tail and sigma[k] <= sde_t_end:
            raise UserError(f"the last segment starts at t={sigma[k]:.3f}, not above the SDE's final t={sde_t_end} "
                            "(sampler.sde_t_end): use fewer segments or a smaller sde_t_end")
        grid = torch.linspace(sigma[k], sde_t_end, steps, dtype=torch.float64).tolist() + [0.0] if sde_tail \
            else torch.linspace(sigma[k], sigma[k + 1], steps + 1, dtype=torch.float64).tolist()
        for i in range(steps):
            stochastic = method == "sde" and not (sde_tail and i == steps - 1)
            out.append(Step(k, grid[i], grid[i + 1], i == 0, stochastic))
    if method == "sde" and repeat_last:
        out.append(Step(segments - 1, sde_t_end, 0.0, False))
    return out


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int  # velocity evaluations (a guided evaluation of cond + null rows counts once)
    steps: list[Step] = field(default_factory=list)


def guided(velocity: Velocity, x, t: float, y, segment: int, first: bool, cfg_scale: float,
           guidance: tuple[float, float], null_class: int) -> torch.Tensor:
    """v with classifier-free guidance: v_null + s·(v_cond − v_null) for t in the guidance interval, else v_cond.
    With s > 1 the null rows are evaluated at every step (so an FRN cache keeps one batch layout)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    if cfg_scale == 1.0:
        return velocity(x, tt, y, segment, first)
    both = velocity(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]), segment, first)
    cond, null = both.chunk(2)
    return null + cfg_scale * (cond - null) if guidance[0] <= t <= guidance[1] else cond


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """∇log p_t(x) on the linear path: ε̂ = (1 − t)·v + x, score = −ε̂ / t."""
    return -((1 - t) * v + x) / t


@torch.no_grad()
def sample(velocity: Velocity, noise: torch.Tensor, y: torch.Tensor, *, segments: int = 1, steps: int = 50,
           method: str = "euler", cfg_scale: float = 1.0, guidance: tuple[float, float] = (0.0, 1.0),
           null_class: int = 0, sde_t_end: float = 0.04, repeat_last: bool = False,
           generator: torch.Generator | None = None) -> SampleResult:
    """Integrate from ``noise`` (t = 1) to data (t = 0); ``method`` euler | heun | sde."""
    if method not in ("euler", "heun", "sde"):
        raise UserError(f"unknown sampler method '{method}' (sampler.method): use euler, heun or sde")
    plan = time_steps(segments, steps, method, sde_t_end, repeat_last)
    x, nfe = noise, 0

    def v(x, t, s: Step, first):
        nonlocal nfe
        nfe += 1
        return guided(velocity, x, t, y, s.segment, first, cfg_scale, guidance, null_class)

    for s in plan:
        dt = s.t_next - s.t
        d = v(x, s.t, s, s.first)
        if s.stochastic:  # reverse SDE, w(t) = 2t: dx = [v − ½·w·score] dt + √w dW̄
            w = 2 * s.t
            drift = d - 0.5 * w * score_from_velocity(d, x, s.t)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + drift * dt + (w * -dt) ** 0.5 * z
        elif method == "heun":
            x_pred = x + d * dt
            x = x + 0.5 * dt * (d + v(x_pred, s.t_next, s, False))
        else:
            x = x + d * dt
    return SampleResult(x, nfe, plan)


def flops_per_sample(fn: Callable[[], SampleResult], batch: int) -> tuple[SampleResult, float]:
    """Run ``fn`` under torch's FLOP counter; return its result and the counted FLOPs per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops() / batch
