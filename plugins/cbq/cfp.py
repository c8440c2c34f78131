"""Coarse-to-fine pre-processing (CBQ §5, Algorithm 1): find outliers in two steps, then clip weight outliers
and move activation-outlier channels into the preceding norm and the consuming linears.

- **coarse**: candidates above the IQR fence T = Q_hi + λ1·(Q_hi − Q_lo) (quartiles 25/75; the msmodelslim
  variant uses the 20th/80th percentiles);
- **fine**: sort the candidates (descending) and split them where M = (min(top) − max(bottom)) − λ2·intra is
  largest; the top part are the true outliers. Paper reading: intra = var(top) + var(bottom), the bottom
  part including the largest non-candidate, so that every candidate may be an outlier. msmodelslim:
  intra = var(bottom), the split within the candidates only, λ2 = 1.
- **weights**: per weight matrix, |w| above the fine threshold is clipped to the largest non-outlier |w| t; the
  clip is the quantizer's range (its min-max step from the weight clamped to ±t, ``CBQLinear(clip=t)``; t times
  the column's scale where activation scales were folded in afterwards), not a change of the model, so the full-precision targets stay the model's own; with ``clip_check`` (our reading) a
  matrix is clipped only where that lowers its own quantization error on the target grid, each input column's
  squared error weighted by its inputs' mean square (the layer-output error proxy);
- **activations**: per channel c of a norm's output (its largest |x| over the calibration tokens; msmodelslim:
  the max and the min separately, the larger scale kept), an outlier channel gets s_c = (m_c / t)^α (t: the
  largest non-outlier value, α = ``exponent``), other channels 1; the norm's weight (and bias) is divided by s
  and every linear that reads the norm's output has its input column c multiplied by s_c: the same function.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from blocktrain.plugins.cbq.settings import CFPSettings
from blocktrain.trainer.compression.quant import QuantSpec, fake_quantize, minmax_qparams
from blocktrain.trainer.compression.replay import forward_with_hooks, probe_layers

__all__ = ["outlier_mask", "weight_clip", "clip_lowers_error", "input_mean_squares", "norm_linear_groups",
           "channel_scales", "fold_scales", "cfp_preprocess"]


def _fine_split(cands: torch.Tensor, rest_max: torch.Tensor | None, lambda2: float, paper: bool) -> int:
    """How many of the descending ``cands`` are true outliers (the argmax of M over the split points)."""
    c = cands.double()
    if paper:
        c = torch.cat([c, rest_max.double().reshape(1)]) if rest_max is not None else c
    m = len(c)
    if m < 2:
        return len(cands)
    k = torch.arange(1, m, dtype=torch.float64)  # top = c[:k], bottom = c[k:]
    s1, s2 = c.cumsum(0)[:-1], (c * c).cumsum(0)[:-1]
    total1, total2 = c.sum(), (c * c).sum()
    var_top = s2 / k - (s1 / k) ** 2
    nb = m - k
    var_bottom = (total2 - s2) / nb - ((total1 - s1) / nb) ** 2
    intra = var_top + var_bottom if paper else var_bottom
    metric = (c[:-1] - c[1:]) - lambda2 * intra
    return int(metric.argmax()) + 1


def outlier_mask(values: torch.Tensor, s: CFPSettings) -> torch.Tensor:
    """True where a value (≥ 0, e.g. a channel's largest |x|) is a true outlier (coarse IQR, then fine split)."""
    v = values.flatten().double()
    q = torch.tensor([0.25, 0.75] if s.variant == "paper" else [0.2, 0.8], dtype=torch.float64)
    lo, hi = torch.quantile(v, q) if v.numel() <= 2**24 else torch.quantile(v[torch.randperm(v.numel())[:2**24]], q)
    candidates = v > hi + s.lambda1 * (hi - lo)
    mask = torch.zeros_like(candidates)
    if not candidates.any():
        return mask.reshape(values.shape)
    order = torch.argsort(v.masked_fill(~candidates, float("-inf")), descending=True)[:int(candidates.sum())]
    rest = v[~candidates]
    n = _fine_split(v[order], rest.max() if rest.numel() else None, s.lambda2 if s.variant == "paper" else 1.0,
                    s.variant == "paper")
    mask[order[:n]] = True
    return mask.reshape(values.shape)


@torch.no_grad()
def weight_clip(weight: torch.Tensor, s: CFPSettings) -> tuple[float, int] | None:
    """The largest non-outlier |w| of one matrix and how many |w| lie above it (None: no outliers)."""
    a = weight.abs()
    mask = outlier_mask(a.float(), s)
    n = int(mask.sum())
    return (float(a[~mask].max()), n) if n and n < a.numel() else None


@torch.no_grad()
def clip_lowers_error(weight: torch.Tensor, clip: float | torch.Tensor, spec: QuantSpec,
                      column_weight: torch.Tensor | None = None) -> bool:
    """Whether round-to-nearest of ``weight`` on the grid of its range clamped to ±``clip`` (a number, or one per
    input column; outliers saturate) has a smaller error than on the grid of its full range: Σ (w − ŵ)², each
    input column weighted by ``column_weight`` (its inputs' mean square: the layer-output error proxy)."""
    w = weight.float()
    cw = torch.ones(()) if column_weight is None else column_weight.float().to(w.device)
    clipped = fake_quantize(w, *minmax_qparams(w.clamp(-clip, clip), spec), spec)
    full = fake_quantize(w, *minmax_qparams(w, spec), spec)
    return bool(((w - clipped).pow(2) * cw).sum() < ((w - full).pow(2) * cw).sum())


@torch.no_grad()
def input_mean_squares(model: nn.Module, names: list[str], batches: Iterable, forward: Callable) -> dict[str, torch.Tensor]:
    """Per Linear of ``names``: the mean square of each input column over the calibration tokens."""
    sums: dict[str, list] = {}

    def hook(name):
        def fn(m, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            old = sums.setdefault(name, [0.0, 0])
            old[0], old[1] = old[0] + x.pow(2).sum(0), old[1] + x.shape[0]
        return fn

    forward_with_hooks(model, batches, forward, [model.get_submodule(n).register_forward_hook(hook(n)) for n in names])
    return {n: total / count for n, (total, count) in sums.items()}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def norm_linear_groups(model: nn.Module, scope: nn.Module, batch: Any, forward: Callable,
                       names: list[str]) -> list[tuple[str, list[str]]]:
    """(norm, [linears]) where each of ``names`` reads exactly the norm's output (one probe forward,
    ``replay.probe_layers``); only norms with an elementwise weight, inside ``scope`` (the block stack)."""
    prefix = {id(m): n for n, m in model.named_modules()}
    norms = [prefix[id(m)] for m in scope.modules() if _is_norm(m) and getattr(m, "weight", None) is not None]
    probe = probe_layers(model, names, batch, forward, producers=norms)
    groups: dict[str, list[str]] = {}
    for name in (n for group in probe.groups for n in group if n in probe.read_from):
        groups.setdefault(probe.read_from[name], []).append(name)
    return list(groups.items())


@torch.no_grad()
def channel_scales(model: nn.Module, norms: list[str], batches: Iterable, forward: Callable,
                   s: CFPSettings) -> dict[str, torch.Tensor]:
    """Per norm: the scale of each output channel (1 but for the outlier channels) from the calibration batches."""
    stats: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def fn(m, a, out):
            flat = out.detach().reshape(-1, out.shape[-1]).float()
            mx, mn = flat.amax(0), flat.amin(0)
            old = stats.get(name)
            stats[name] = [mx, mn] if old is None else [torch.maximum(old[0], mx), torch.minimum(old[1], mn)]
        return fn

    forward_with_hooks(model, batches, forward, [model.get_submodule(n).register_forward_hook(hook(n)) for n in norms])
    scales = {}
    for name, (mx, mn) in stats.items():
        sides = [torch.maximum(mx, -mn)] if s.variant == "paper" else [mx.clamp_min(0), (-mn).clamp_min(0)]
        scale = torch.ones_like(mx)
        for m in sides:
            mask = outlier_mask(m, s)
            if mask.any() and not mask.all():
                t = m[~mask].max().clamp_min(1e-8)
                scale = torch.maximum(scale, torch.where(mask, (m / t).clamp_min(1) ** s.exponent, torch.ones_like(m)))
        scales[name] = scale
    return scales


@torch.no_grad()
def fold_scales(model: nn.Module, norm: str, linears: list[str], scale: torch.Tensor) -> None:
    """x/s into the norm's weight (and bias), s into the input columns of every consuming linear: same function."""
    module = model.get_submodule(norm)
    s = scale.to(module.weight.device)
    module.weight.div_(s.to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.div_(s.to(module.bias.dtype))
    for name in linears:
        weight = model.get_submodule(name).weight
        weight.mul_(s.to(weight.device, weight.dtype))


@torch.no_grad()
def cfp_preprocess(model: nn.Module, scope: nn.Module, names: list[str], batches: list, forward: Callable,
                   s: CFPSettings, spec: QuantSpec) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """CFP on ``model`` in place: find the weight outliers of ``names``, then fold the activation-outlier scales
    of every norm → linears group inside ``scope`` (the same function). Returns counts for the log and, per
    clipped weight, its clip bound for the quantizer on ``spec`` (the threshold times each input column's folded
    scale, so a scaled column is not clipped back; the weights themselves are not clipped)."""
    found = {n: weight_clip(model.get_submodule(n).weight, s) for n in names} if s.clip_weights else {}
    column_scale: dict[str, torch.Tensor] = {}
    scaled = 0
    if s.scale_activations:  # None was resolved by the caller
        groups = norm_linear_groups(model, scope, batches[0], forward, names)
        scales = channel_scales(model, [g for g, _ in groups], batches, forward, s)
        for norm, linears in groups:
            fold_scales(model, norm, linears, scales[norm])
            scaled += int((scales[norm] > 1).sum())
            column_scale.update({n: scales[norm] for n in linears})
    clips, clipped, refused = {}, 0, 0
    mean_squares = input_mean_squares(model, [n for n, h in found.items() if h], batches, forward) if s.clip_check else {}
    for name, hit in found.items():
        if hit is None:
            continue
        weight = model.get_submodule(name).weight
        bound = hit[0] * column_scale.get(name, torch.ones(())).to(weight.device)
        if s.clip_check and not clip_lowers_error(weight, bound, spec, mean_squares[name]):
            refused += 1
            continue
        clips[name] = bound
        clipped += hit[1]
    return ({"clipped_weights": float(clipped), "clipped_matrices": float(len(clips)),
             "unclipped_matrices": float(refused), "scaled_channels": float(scaled)}, clips)
