"""LPViT on any ``nn.Module``: the label-free gradient statistic, per-layer curves, equal-slope allocation to a FLOPs
budget and the block masks. Plain PyTorch; ``plugin.py`` binds it to a run.

    masks, info = lpvit_prune(model, batches, LPViTSettings(block=(32, 32), flops=0.5))
    attach_masks(model, masks)   # blocktrain.trainer.compression.fixed_masks: buffers the fine-tune cannot revive
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from blocktrain.plugins.lpvit import curves as C
from blocktrain.trainer.compression.calibration import calibration_forward, without_stochastic_depth

__all__ = ["LPViTSettings", "LayerStats", "check_targets", "gradient_statistic", "layer_curves", "allocate",
           "lpvit_prune", "masks_from_gradients", "flops_ratio"]


@dataclass
class LPViTSettings:
    """The core's knobs (the plugin's config maps onto these)."""

    flops: float = 0.5  # fraction of the pruned layers' FLOPs kept (the code's `amount` with --flop_budget)
    block: tuple[int, int] = (32, 32)  # R x C, rows = output features
    ranking: str = "taylor"  # taylor: |W ⊙ g| | l1: |W|
    second_order: bool = True
    damp: float = 1e-7
    smooth: float | None = 0.5  # de-biased EMA weight; None = no smoothing
    power: bool = True  # add β·P with automatic β (the code's lambda_power > 0)
    h: int = 4  # stencil step of the allocation's derivatives
    min_density: float = 0.05  # the code's min_sp
    grid: int = 100  # amounts 0, 1/grid, ..., 1 (the code's maxdeadzones)
    tolerance: float = 0.02  # bisection stops when |FLOPs kept - flops| <= tolerance
    max_iters: int = 40
    faithful: bool = True  # the code's + β·P, incremental second-order update and inexact odd-step stencil; False:
    #                        - β·P, the closed form and the exact 5-point stencil
    normalize: bool = True  # bisect on slopes in units of the median layer's largest derivative (False: as coded)
    select: str = "slope"  # slope: argmin_a |C'(a) - λ| (as coded) | lagrangian: argmin_a C(a) - λ·a


@dataclass
class LayerStats:
    """What the allocation needs of one layer: its mean gradient, block order, positions (output tokens or pixels per
    sample) and input width for the power curve."""

    grad: torch.Tensor
    order: torch.Tensor
    block_sizes: torch.Tensor  # elements of each block, in ``order`` (edge blocks are smaller)
    positions: int
    in_channels: int
    bias: int  # bias additions per sample (positions x out), fixed FLOPs

    def kept_elements(self, amount: float) -> int:
        return int(self.block_sizes[:C.kept_blocks(self.order.numel(), amount)].sum())

    def flops(self, amount: float) -> float:
        return float(self.kept_elements(amount)) * self.positions + self.bias


def check_targets(model: nn.Module, names: list[str], block: tuple[int, int], ceil_mode: bool, where: str) -> list[str]:
    """Problems with the target layers as messages (empty: fine): a weight shared with another module (tied
    embeddings: masking it would prune the embedding too), or, without ``ceil_mode``, a block shape that does not
    tile a layer."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    problems = []
    for name in names:
        weight = model.get_submodule(name).weight
        rows, cols = C.as_matrix(weight).shape
        if counts.get(id(weight), 0) > 1:
            problems.append(f"{name}.weight is shared with another module (tied weights); add "
                            f"'{name.rsplit('.', 1)[-1]}' to {where}.exclude")
        if not ceil_mode and (rows % block[0] or cols % block[1]):
            problems.append(f"block {block[0]}x{block[1]} does not tile {name} ({rows}x{cols} as out x in·k·k): "
                            f"{where}.ceil_mode=true scores the overhanging edge blocks on their valid part and keeps "
                            f"or prunes them whole, as the official code; or choose a block that divides both sides, "
                            f"or add '{name.rsplit('.', 1)[-1]}' to {where}.exclude")
    return problems


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def gradient_statistic(model: nn.Module, names: list[str], batches: Iterable, forward: Callable = calibration_forward,
                       sums: dict[str, torch.Tensor] | None = None, shapes: dict[str, tuple] | None = None,
                       on_batch: Callable[[int], None] | None = None, start: int = 0) -> tuple[dict, dict]:
    """Σ over ``batches`` of ∂ mean(f(x)²)/∂W per target layer (the model in ``train()`` mode, no labels), and each
    layer's (positions, input width) from the first batch's forward. Divide the sums by the batch count for the
    code's mean gradient. ``sums``/``start``/``on_batch`` let a caller resume and report per batch. Stochastic depth
    is off for the pass (the official pruning script builds its model without it; a fine-tune may use it)."""
    modules = {n: model.get_submodule(n) for n in names}
    sums = {} if sums is None else sums
    shapes = {} if shapes is None else shapes
    was_training = model.training
    flags = {n: m.weight.requires_grad for n, m in modules.items()}
    hooks = []
    if not shapes:
        def hook(name):
            def fn(module, args, output):
                out = output if isinstance(output, torch.Tensor) else output[0]
                width = args[0].shape[-1] if isinstance(module, nn.Linear) else args[0].shape[2]  # conv: index 1 of
                shapes[name] = (out.numel() // (out.shape[0] * module.weight.shape[0]), int(width))  # shape[1:], as coded
            return fn

        hooks = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    model.train()
    try:
        for m in modules.values():
            m.weight.requires_grad_(True)
        for i, batch in enumerate(batches):
            if i < start:
                continue
            with without_stochastic_depth(model):
                loss = _logits(forward(model, batch)).float().pow(2).mean()
            grads = torch.autograd.grad(loss, [m.weight for m in modules.values()], allow_unused=True)
            for hook_handle in hooks:
                hook_handle.remove()
            hooks = []
            for n, g in zip(modules, grads):
                if g is not None:
                    sums[n] = g.detach().float().clone() if n not in sums else sums[n].add_(g.detach().float())
            if on_batch is not None:
                on_batch(i)
    finally:
        for hook_handle in hooks:
            hook_handle.remove()
        for n, m in modules.items():
            m.weight.requires_grad_(flags[n])
        model.train(was_training)
    return sums, shapes


def layer_curves(weight: torch.Tensor, grad: torch.Tensor, s: LPViTSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(block order, smoothed distortion curve) of one layer."""
    order = C.block_order(C.block_scores(weight, grad, s.block, s.ranking))
    curve = C.distortion_curve(weight, grad, order, s.block, s.grid, s.second_order, s.damp, incremental=s.faithful)
    return order, (C.ema_smooth(curve, s.smooth) if s.smooth is not None else curve)


def _amounts_at(slopes: list[torch.Tensor], amounts: torch.Tensor, slope: float, cap: float) -> list[float]:
    """Each layer's amount whose derivative (``slopes``) is closest to ``slope`` (first on ties), capped at ``cap``
    (the code's ``pareto_condition``). Above a layer's largest derivative the closest is that largest one: taken
    exactly, where |d − 2^s| in floating point would round every d alike for large s."""
    picks = [int(torch.argmax(d)) if slope >= float(d.max()) else int(torch.argmin((d - slope).abs())) for d in slopes]
    return [min(cap, float(amounts[i])) for i in picks]


def _lagrangian_amounts(costs: list[torch.Tensor], amounts: torch.Tensor, slope: float, cap: float) -> list[float]:
    """Each layer's amount minimising C(a) − slope·a (first on ties), capped at ``cap`` (the line the code has
    commented out in ``pareto_condition``). On a convex curve it is where the slope crosses ``slope``; on any curve it
    never decreases as ``slope`` grows, so the bisection's FLOPs are monotone."""
    return [min(cap, float(amounts[int(torch.argmin(c - slope * amounts))])) for c in costs]


def flops_ratio(stats: dict[str, LayerStats], amounts: dict[str, float]) -> float:
    """FLOPs of the pruned layers kept at ``amounts``, over their dense FLOPs."""
    return sum(st.flops(amounts[n]) for n, st in stats.items()) / sum(st.flops(0.0) for st in stats.values())


def allocate(costs: dict[str, torch.Tensor], stats: dict[str, LayerStats], s: LPViTSettings) -> tuple[dict, float]:
    """Equal-slope allocation: bisection on s ∈ [−100, 100] until the FLOPs kept at slope 2^s are within
    ``tolerance`` of ``flops`` (the code's ``find_slope``/``binary_search``); returns (amounts, log2 slope).

    With ``normalize`` the derivatives are divided by the median over layers of their largest value before the
    search (the slope returned is in the curves' own units). Equal slopes are unchanged by a common scale, but the
    search's first probe, 2^0, is not: on curves whose derivatives are all far below 1 (a language model's
    mean-squared-logit gradients) it puts every layer at its largest derivative, and such a degenerate allocation
    can land within ``tolerance`` of the budget by chance and end the search."""
    names = list(costs)
    amounts_grid = torch.arange(s.grid + 1, dtype=torch.float64) / s.grid
    cap = 1 - min(s.min_density, (1 - s.flops) / 2)
    slopes = [C.derivative(amounts_grid, costs[n], s.h, exact=not s.faithful) for n in names]
    peaks = sorted(float(d.max()) for d in slopes)
    scale = peaks[len(peaks) // 2] if s.normalize and peaks[len(peaks) // 2] > 0 else 1.0
    slopes = [d / scale for d in slopes]
    scaled = [costs[n] / scale for n in names]

    def kept(slope_log2: float) -> tuple[float, dict]:
        if s.select == "lagrangian":
            picks = _lagrangian_amounts(scaled, amounts_grid, 2.0 ** slope_log2, cap)
        else:
            picks = _amounts_at(slopes, amounts_grid, 2.0 ** slope_log2, cap)
        amounts = dict(zip(names, picks))
        return flops_ratio(stats, amounts), amounts

    lo, hi = -100.0, 100.0
    mid = 0.0
    for i in range(s.max_iters):
        mid = (lo + hi) / 2
        ratio, _ = kept(mid)
        if abs(ratio - s.flops) <= s.tolerance:
            break
        if ratio > s.flops:
            lo = mid  # too much kept: a steeper slope prunes more
        else:
            hi = mid
    else:  # as coded: after max_iters the closest of mid, lo and hi
        mid = min((lo, hi, mid), key=lambda v: abs(kept(v)[0] - s.flops))
    return kept(mid)[1], mid + math.log2(scale)


def lpvit_prune(model: nn.Module, batches: list, s: LPViTSettings, names: list[str] | None = None,
                forward: Callable = calibration_forward) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole method on ``model`` (weights untouched): returns (bool keep-masks by layer name, ``info``).
    ``names`` default to every Linear and Conv2d."""
    from blocktrain.trainer.compression.fixed_masks import find_weight_layers

    names = find_weight_layers(model) if names is None else names
    sums, shapes = gradient_statistic(model, names, batches, forward)
    grads = {n: sums[n] / len(batches) for n in names if n in sums and n in shapes}
    return masks_from_gradients(model, grads, shapes, s)


def masks_from_gradients(model: nn.Module, grads: dict[str, torch.Tensor], shapes: dict[str, tuple],
                         s: LPViTSettings) -> tuple[dict[str, torch.Tensor], dict]:
    """Curves, allocation and masks from the mean gradients; ``info`` holds the amounts, the FLOPs kept, β, the
    log2 slope, each layer's (positions, bias FLOPs) and the curves (``distortion``, ``power``, ``total``)."""
    stats, costs = build_costs(model, grads, shapes, s)
    if s.flops < 1:
        amounts, slope = allocate(costs["total"], stats, s)
    else:
        amounts, slope = {n: 0.0 for n in stats}, float("nan")
    info = {"amounts": amounts, "flops": flops_ratio(stats, amounts), "slope_log2": slope,
            "positions": {n: (st.positions, st.bias) for n, st in stats.items()}, **costs}
    return masks_for(model, stats, amounts, s), info


def build_costs(model: nn.Module, grads: dict[str, torch.Tensor], shapes: dict[str, tuple],
                s: LPViTSettings) -> tuple[dict[str, LayerStats], dict]:
    """Per-layer stats and curves: ``distortion``, ``power``, ``beta`` and ``total`` = δ ± β·P."""
    stats, dist, power = {}, {}, {}
    for name, grad in grads.items():
        module = model.get_submodule(name)
        weight = module.weight.detach()
        order, dist[name] = layer_curves(weight, grad, s)
        rows, cols = C.as_matrix(weight).shape
        ones = torch.ones(rows, cols, dtype=torch.float64, device=weight.device)
        sizes = C.block_sums(ones, s.block)[order].long().cpu()
        positions, width = shapes[name]
        bias = positions * rows if getattr(module, "bias", None) is not None else 0
        stats[name] = LayerStats(grad, order.cpu(), sizes, positions, width, bias)
        power[name] = C.power_curve(weight.numel(), s.block, width, s.grid)
    dist = {n: d.cpu() for n, d in dist.items()}
    amounts = torch.arange(s.grid + 1, dtype=torch.float64) / s.grid
    beta = C.auto_beta(amounts, list(dist.values()), list(power.values()), exact=not s.faithful) if s.power else 0.0
    sign = 1.0 if s.faithful else -1.0
    total = {n: dist[n] + sign * beta * power[n] for n in dist}
    return stats, {"distortion": dist, "power": power, "beta": beta, "total": total}


def masks_for(model: nn.Module, stats: dict[str, LayerStats], amounts: dict[str, float],
              s: LPViTSettings) -> dict[str, torch.Tensor]:
    """Bool keep-masks at each layer's amount."""
    masks = {}
    for name, st in stats.items():
        masks[name] = C.block_mask(st.order, amounts[name], model.get_submodule(name).weight.shape, s.block)
    if not masks:
        print("lpvit: no target layer was reached by the calibration forward", file=sys.stderr)
    return masks
