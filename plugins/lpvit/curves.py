"""LPViT's per-layer mathematics (Xu et al., ECCV 2024; official code Akimoto-Cris/LPViT, as coded):
R×C block scores and masks, rate–distortion curves, power curves, smoothing and the 5-point-stencil derivative.

A layer's weight is seen as a matrix (out, in·k·k). Blocks are scored by the mean of |W ⊙ g| (``taylor``) or |W|
(``l1``) over each R×C block, pooled with ``ceil_mode`` (edge blocks that overhang are averaged over their valid
part); at pruning amount ``a`` the top int((1 − a)·#blocks) blocks are kept. Ties are broken by block index, so
masks are deterministic.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["as_matrix", "block_grid", "block_scores", "block_order", "kept_blocks", "block_mask", "block_sums", "distortion_curve",
           "power_curve", "ema_smooth", "derivative", "auto_beta"]


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight as (out, in·k·k): a Linear's as it is, a Conv2d's flattened per output channel."""
    return weight.reshape(weight.shape[0], -1)


def block_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Blocks per column and per row of a (rows, cols) matrix, edge blocks included (ceil)."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def block_scores(weight: torch.Tensor, grad: torch.Tensor | None, block: tuple[int, int],
                 ranking: str = "taylor") -> torch.Tensor:
    """(blocks down, blocks across) mean score of each block: |W ⊙ g| (``taylor``) or |W| (``l1``), AvgPool2d with
    ``ceil_mode`` as the official ``get_mask_blockwise_fast``."""
    w = as_matrix(weight).double()
    score = w.abs() if ranking == "l1" else (w * as_matrix(grad).double()).abs()
    return F.avg_pool2d(score[None, None], block, stride=block, ceil_mode=True)[0, 0]


def block_order(scores: torch.Tensor) -> torch.Tensor:
    """Flat block indices from the highest score to the lowest (ties: the lower index first)."""
    return torch.argsort(-scores.flatten(), stable=True)


def kept_blocks(n_blocks: int, amount: float) -> int:
    """Blocks kept at pruning amount ``amount``: int((1 − amount)·n), as coded."""
    return n_blocks if amount <= 0 else int((1 - amount) * n_blocks)


def block_mask(order: torch.Tensor, amount: float, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Bool keep-mask shaped like the weight (``shape``): the first ``kept_blocks`` blocks of ``order``."""
    rows, cols = shape[0], math.prod(shape[1:])
    keep = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    keep[order[:kept_blocks(order.numel(), amount)]] = True
    full = keep.view(block_grid(rows, cols, block)).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[:rows, :cols].reshape(shape)


def block_sums(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-block sums of a (rows, cols) matrix (zero padding at the edges), flattened in block order."""
    rows, cols = values.shape
    nr, nc = block_grid(rows, cols, block)
    padded = values if (nr * block[0], nc * block[1]) == (rows, cols) else \
        F.pad(values, (0, nc * block[1] - cols, 0, nr * block[0] - rows))
    return padded.view(nr, block[0], nc, block[1]).sum((1, 3)).flatten()


def distortion_curve(weight: torch.Tensor, grad: torch.Tensor, order: torch.Tensor, block: tuple[int, int],
                     grid: int = 100, second_order: bool = True, damp: float = 1e-7,
                     incremental: bool = False) -> torch.Tensor:
    """δ(a) for a = 0, 1/grid, …, 1 (float64): mean((Δw ⊙ g)²), plus with ``second_order`` the empirical-Fisher term
    ½ Δwᵀ(g gᵀ + λI)Δw, Δw = W ⊙ M_a − W.

    ``incremental=False`` evaluates that term in closed form, ½(g·Δw)² + ½λ‖Δw‖². ``incremental=True`` is the official
    code's update between consecutive amounts, Σ_j ½(ΔΔw + 2Δw)·(g (g·ΔΔw) + λ·1[ΔΔw ≠ 0]): it over-counts
    ΔΔwᵀ g gᵀ ΔΔw per step and adds λ (not λ·ΔΔw) on the newly pruned entries. Masks at increasing amounts are nested,
    so every term is a cumulative sum over blocks in ascending score order.
    """
    w, g = as_matrix(weight).double(), as_matrix(grad).double()
    ascending = order.flip(0)  # blocks in the order they are pruned
    n = order.numel()

    def pruned_cumsum(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values.new_zeros(1), block_sums(values, block)[ascending].cumsum(0)])

    pruned = torch.tensor([n - kept_blocks(n, d / grid) for d in range(grid + 1)], device=w.device)
    wg2 = pruned_cumsum((w * g) ** 2)[pruned]
    curve = wg2 / w.numel()
    if not second_order:
        return curve
    g_dw = -pruned_cumsum(w * g)[pruned]  # g·Δw
    if not incremental:
        return curve + 0.5 * g_dw ** 2 + 0.5 * damp * pruned_cumsum(w * w)[pruned]
    w_new = pruned_cumsum(torch.where(w != 0, w, 0.0))[pruned]  # Σ W over all pruned entries so far
    g_ddw = torch.diff(g_dw, prepend=g_dw[:1])  # g·ΔΔw, 0 at a = 0
    sum_ddw = -torch.diff(w_new, prepend=w_new[:1])  # Σ ΔΔw over its non-zero entries
    # ½(ΔΔw + 2Δw)·(g(g·ΔΔw) + λ 1[ΔΔw≠0]); on ΔΔw's support Δw = ΔΔw, so the λ part is ½·3λ·ΣΔΔw
    steps = 0.5 * (g_ddw + 2 * g_dw) * g_ddw + 1.5 * damp * sum_ddw
    return curve + steps.cumsum(0)


def power_curve(numel: int, block: tuple[int, int], in_channels: int, grid: int = 100) -> torch.Tensor:
    """P(a) = a · numel/(R·C) · ⌊C_in/16⌋ for a = 0, 1/grid, …, 1 (the code's ``num_survived_w_blocks``, which counts
    the pruned blocks)."""
    amounts = torch.arange(grid + 1, dtype=torch.float64) / grid
    return amounts * numel / (block[0] * block[1]) * float(in_channels // 16)


def ema_smooth(values: torch.Tensor, weight: float) -> torch.Tensor:
    """De-biased exponential moving average (TensorBoard's smoothing, the code's ``algo.smooth``)."""
    out = torch.empty_like(values)
    last = 0.0
    for i, value in enumerate(values.tolist()):
        last = last * weight + (1 - weight) * value
        out[i] = last / (1 - weight ** (i + 1)) if weight != 1 else last
    return out


def derivative(xs: torch.Tensor, ys: torch.Tensor, h: int, exact: bool = False) -> torch.Tensor:
    """The code's ``derivative_approx``: len(xs) − 1 values; at i, step h_i = min(h, i, n − i − 1) and the 5-point
    stencil (−y[i+h_i] + 8y[i+⌊h_i/2⌋] − 8y[i−⌊h_i/2⌋] + y[i−h_i]) / (6(x[i+h_i] − x[i])); one-sided or central
    differences where h_i < 2.

    As coded, an odd h_i (i = 3, 5, … and their mirrors near a = 1) makes the stencil inexact: on a straight line it
    returns (16⌊h_i/2⌋ − 2h_i)/(6h_i) of the slope, 0.56 at h_i = 3. ``exact`` rounds an odd h_i down to even, which
    gives the true 5-point stencil with step h_i/2."""
    x, y, n = xs.tolist(), ys.tolist(), len(xs)
    out = []
    for i in range(n - 1):
        k = min(h, i, n - i - 1)
        if exact and k > 2 and k % 2:
            k -= 1
        if k < 2 and i < 2:
            out.append((y[i + 1] - y[i]) / (x[i + 1] - x[i]))
        elif k < 2:
            out.append((y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1]))
        else:
            half = k // 2
            out.append((-y[i + k] + 8 * y[i + half] - 8 * y[i - half] + y[i - k]) / (6 * (x[i + k] - x[i])))
    return torch.tensor(out, dtype=torch.float64)


def auto_beta(amounts: torch.Tensor, distortions: list[torch.Tensor], powers: list[torch.Tensor],
              exact: bool = False) -> float:
    """β = mean over layers of max dδ/da ÷ mean over layers of max dP/da (derivatives with h = 10, as coded);
    0 when no layer has a power cost (every input narrower than 16)."""
    dist = sum(float(derivative(amounts, d, 10, exact).max()) for d in distortions) / len(distortions)
    power = sum(float(derivative(amounts, p, 10, exact).max()) for p in powers) / len(powers)
    return dist / power if power > 0 else 0.0
