"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a layer's weight column by column, spreading each column's rounding error over the
columns not yet quantized through the Cholesky factor of the inverse input Hessian (lazy block updates).

The Hessian and its damped Cholesky inverse come from the shared ``compression.hessian``, the layer-sequential
calibration from ``compression.replay``, the grid from ``compression.quant``. Group scales are computed when the
sweep reaches a group's first column, from that group's weights as updated by every column swept before it
(``static_groups``: from the original weights, before the sweep). With ``act_order`` the columns are swept in
descending Hessian diagonal; groups stay contiguous input columns (the grid has no per-column group index).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from blocktrain.kernels.dispatch import one_cpu_thread
from blocktrain.trainer.compression.hessian import HessianAccumulator, cholesky_inverse_upper
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import ActQuantSpec, QuantSpec, dequantize, minmax_qparams, qrange
from blocktrain.trainer.compression.quantizing import replace_with_quant_linears
from blocktrain.trainer.compression.replay import calibrate_layers, default_forward

__all__ = ["SharedFactor", "gptq_factor", "gptq_layer", "gptq_quantize"]


SUB_BLOCK = 16  # columns whose errors are applied to each other at once; then to the rest of the block by one matmul


@torch.no_grad()
def gptq_layer(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, damp: float = 0.01,
               act_order: bool = False, static_groups: bool = False, keep: torch.Tensor | None = None,
               factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize one weight [out, in] given its input Hessian [in, in]. Returns (codes, scale, zero) on ``spec``.

    ``keep`` (True = kept) marks a pruned weight's surviving entries: the others get code = zero point (ŵ = 0)
    and their error is spread like any other's. ``factor``: ``gptq_factor(H, damp, act_order)`` when already
    computed (the layers of a group share it).

    The sweep works on the transposed weight (a column is a contiguous row) and applies errors lazily at two
    levels: within a sub-block of ``SUB_BLOCK`` columns one outer product per column, to the rest of the block
    one matmul per sub-block, to the columns after the block one matmul per block (the paper's lazy batch);
    on the CPU on one intra-op thread (``one_cpu_thread``).
    """
    with one_cpu_thread(weight.device):
        return _sweep(weight, H, spec, blocksize, damp, act_order, static_groups, keep, factor)


def _sweep(weight, H, spec, blocksize, damp, act_order, static_groups, keep, factor):
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = H.to(W.device)
    W[:, H.diagonal() == 0] = 0
    if keep is not None:
        W[~keep] = 0
    g = spec.group_size or cols
    n_groups = spec.n_groups(cols)
    column_spec = QuantSpec(spec.bits, spec.symmetric)
    ready = [static_groups or spec.group_size is None] * n_groups
    scale_t = torch.zeros(n_groups, rows, device=W.device)  # [group, row]: a group's scales contiguous
    zero_t = torch.zeros_like(scale_t)
    if ready[0]:
        scale, zero = minmax_qparams(W, spec)
        scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()

    perm, U = gptq_factor(H, damp, act_order) if factor is None else factor
    perm, U = perm.to(W.device), U.to(W.device)
    position = torch.argsort(perm)  # column c is swept at position[c]
    group_of = (perm // g).tolist()  # the group of the column swept at each position
    Wt = W[:, perm].T.contiguous()  # [position, row]
    keep_t = None if keep is None else keep[:, perm].T.contiguous()
    Qt = torch.empty_like(Wt)
    diag = U.diagonal().tolist()
    lo, hi = qrange(spec)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        E = torch.empty(i2 - i1, rows, device=W.device)  # the block's scaled errors, one row per column
        for j1 in range(i1, i2, SUB_BLOCK):
            j2 = min(j1 + SUB_BLOCK, i2)
            for p in range(j1, j2):
                k = group_of[p]
                if not ready[k]:  # the sweep reaches group k: its range from its weights as updated so far
                    at = position[k * g:(k + 1) * g]
                    current = Wt[at]  # a copy; rows at or after j2 still lack the errors of [j1, p), after i2 of [i1, p)
                    late, later = at >= j2, at >= i2
                    current[late] -= U[j1:p, at[late]].T @ E[j1 - i1:p - i1]
                    current[later] -= U[i1:j1, at[later]].T @ E[:j1 - i1]
                    if keep_t is not None:
                        current = current * keep_t[at]
                    s, z = minmax_qparams(current.T, column_spec)
                    scale_t[k], zero_t[k] = s[:, 0], z[:, 0]
                    ready[k] = True
                s, z, w = scale_t[k], zero_t[k], Wt[p]
                q = torch.round(w / s).add_(z).clamp_(lo, hi)  # quant.quantize of one column, inlined (the hot loop)
                if keep_t is not None:
                    q = torch.where(keep_t[p], q, z)
                Qt[p] = q
                e = E[p - i1]
                torch.sub(w, s * (q - z), out=e).div_(diag[p])
                if p + 1 < j2:
                    Wt[p + 1:j2].addr_(U[p, p + 1:j2], e, alpha=-1)
            if j2 < i2:
                Wt[j2:i2].addmm_(U[j1:j2, j2:i2].T, E[j1 - i1:j2 - i1], alpha=-1)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E, alpha=-1)
    return Qt[position].T.to(torch.int32), scale_t.T.contiguous(), zero_t.T.contiguous()


def gptq_factor(H: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep order (descending Hessian diagonal with ``act_order``, else the identity) and the upper Cholesky
    factor of the damped inverse Hessian in that order."""
    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(H.shape[0], device=H.device))
    return perm, cholesky_inverse_upper(H[perm][:, perm], damp)


class SharedFactor:
    """``gptq_factor`` of the last Hessian asked for, computed once for the layers of a group (they share it)."""

    def __init__(self, damp: float, act_order: bool):
        self.damp, self.act_order = damp, act_order
        self.stats, self.factor = None, None

    def __call__(self, stats: HessianAccumulator) -> tuple[torch.Tensor, torch.Tensor]:
        if stats is not self.stats:
            self.stats, self.factor = stats, gptq_factor(stats.H, self.damp, self.act_order)
        return self.factor


def gptq_quantize(model: nn.Module, batches: Iterable, spec: QuantSpec, forward: Callable = default_forward,
                  names: list[str] | None = None, act: ActQuantSpec | None = None, blocksize: int = 128,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = False) -> nn.Module:
    """GPTQ over the named Linears (default: all but ``lm_head``), layer group by layer group, each from the
    inputs of the model quantized so far; then each becomes a ``QuantLinear`` (in place)."""
    if act is not None and not act.dynamic:
        raise ValueError("static activation ranges are calibrated by the gptq plugin; use a dynamic ActQuantSpec here")
    entries = {}
    factors = SharedFactor(damp, act_order)

    def finish(name: str, module: nn.Module, stats: HessianAccumulator) -> None:
        codes, scale, zero = gptq_layer(module.weight, stats.H, spec, blocksize, damp, act_order, static_groups,
                                        factor=factors(stats))
        with torch.no_grad():
            module.weight.copy_(dequantize(codes, scale, zero, module.weight.dtype, spec.group_size))
        entries[name] = {"codes": codes, "scale": scale, "zero": zero}

    names = find_linear_names(model) if names is None else names
    calibrate_layers(model, names, batches, forward,
                     lambda m: HessianAccumulator(m.in_features, device=m.weight.device), finish)
    replace_with_quant_linears(model, entries, spec, act)
    return model
