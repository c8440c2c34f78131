"""BFM's training objectives and its velocity for the samplers, in plain PyTorch (no engine needed).

- ``split_sizes`` / ``draw_times``: the minibatch split evenly across the K segments, t ~ U[σ_{k+1}, σ_k] in each;
- ``bfm_loss``: MSE(v_θ, ε − x) over all segments at once + the alignment term −cos(proj(h), z_encoder);
- ``frn_loss``: stage 2, MSE(ĥ(t), h(x_t, t)) with the trunk frozen;
- ``BFMVelocity``: the velocity callable of ``trainer.generative.flow.sample``, with the FRN cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blocktrain.trainer.generative.flow import interpolate, segment_bounds

from .model import BFM, bounds


def split_sizes(batch: int, segments: int) -> list[int]:
    """Rows per segment: ``batch // K`` each, the remainder one each to the noisiest segments."""
    base, extra = divmod(batch, segments)
    return [base + (k < extra) for k in range(segments)]


def draw_times(u: torch.Tensor, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map uniforms ``u`` (one per row) to (t, segment): consecutive chunks of ``split_sizes`` go to segments
    0..K−1 and t = σ_{k+1} + (σ_k − σ_{k+1})·u ∈ [σ_{k+1}, σ_k]."""
    sizes = split_sizes(u.shape[0], segments)
    segment = torch.repeat_interleave(torch.arange(segments, device=u.device), torch.tensor(sizes, device=u.device))
    sigma = segment_bounds(segments).to(u.device)
    lo, hi = sigma[segment + 1], sigma[segment]
    return (lo + (hi - lo) * u.double()).to(u.dtype), segment


def alignment_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−cos(features, target) per token, averaged over tokens and the batch (REPA's projection loss)."""
    return -F.cosine_similarity(features, target, dim=-1).mean()


def bfm_loss(model: BFM, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, u: torch.Tensor,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"velocity": MSE, "align": −cos}`` (``align`` only with encoder features ``target`` of shape (B, N, D))."""
    t, segment = draw_times(u, model.segments)
    v, h = model(interpolate(x, eps, t), t, y, segment=segment, return_features=True)
    terms = {"velocity": F.mse_loss(v, eps - x)}
    if target is not None:
        terms["align"] = alignment_loss(model.projector(h), target)
    return terms


def frn_prediction(model: BFM, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                   segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ĥ(t), h(x_t, t)) for rows at times t in their segments, on the same noise ε; the trunk runs without grad."""
    sigma = segment_bounds(model.segments).to(t.device)
    t_start, t_end = sigma[segment].to(t.dtype), sigma[segment + 1].to(t.dtype)
    coeff = (t_start - t) / (t_start - t_end)
    c = model.condition(t, y)
    with torch.no_grad():
        h_start = model.trunk(interpolate(x, eps, t_start), model.condition(t_start, y))
        h = model.trunk(interpolate(x, eps, t), c)
    return model.frn(interpolate(x, eps, t), c, h_start, coeff), h


def frn_loss(model: BFM, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    t, segment = draw_times(u, model.segments)
    pred, h = frn_prediction(model, x, y, eps, t, segment)
    return F.mse_loss(pred, h)


class BFMVelocity:
    """``(x, t, y, segment, first) -> v`` for ``flow.sample``. With ``frn``: the full trunk runs at the first step
    of each segment and is cached; later steps predict it with the FRN from that cache."""

    def __init__(self, model: BFM, frn: bool = False):
        self.model, self.use_frn = model, frn
        self.cache: tuple[torch.Tensor, float] | None = None

    def __call__(self, x, t, y, segment: int, first: bool):
        c = self.model.condition(t, y)
        if not self.use_frn or first:
            h = self.model.trunk(x, c)
            self.cache = (h, float(t[0]))
        else:
            h_start, t_start = self.cache
            t_end = bounds(segment, self.model.segments)[1]
            h = self.model.frn(x, c, h_start, (t_start - t) / (t_start - t_end))
        return self.model.velocity(x, h, c, segment)
