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

from blocktrain.trainer.compression.hessian import HessianAccumulator, cholesky_inverse_upper
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import ActQuantSpec, QuantSpec, dequantize, minmax_qparams, quantize
from blocktrain.trainer.compression.quantizing import replace_with_quant_linears
from blocktrain.trainer.compression.replay import calibrate_layers, default_forward

__all__ = ["gptq_layer", "gptq_quantize"]


@torch.no_grad()
def gptq_layer(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, damp: float = 0.01,
               act_order: bool = False, static_groups: bool = False, keep: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize one weight [out, in] given its input Hessian [in, in]. Returns (codes, scale, zero) on ``spec``.

    ``keep`` (True = kept) marks a pruned weight's surviving entries: the others get code = zero point (ŵ = 0)
    and their error is spread like any other's.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = H.to(W.device)
    W[:, H.diagonal() == 0] = 0
    if keep is not None:
        W[~keep] = 0
    g = spec.group_size or cols
    n_groups = spec.n_groups(cols)
    column_spec = QuantSpec(spec.bits, spec.symmetric)
    scale = torch.zeros(rows, n_groups, device=W.device)
    zero = torch.zeros_like(scale)
    ready = torch.zeros(n_groups, dtype=torch.bool)
    if static_groups or spec.group_size is None:
        scale, zero = minmax_qparams(W, spec)
        ready[:] = True

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    perm = perm.to(W.device)
    position = torch.argsort(perm)  # column c is swept at position[c]
    W = W[:, perm]
    keep_p = None if keep is None else keep[:, perm]
    U = cholesky_inverse_upper(H[perm][:, perm], damp)
    Q = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            p = i1 + i
            k = int(perm[p]) // g
            if not ready[k]:  # the sweep reaches group k: its range from its weights as updated so far
                at = position[k * g:(k + 1) * g]
                current = torch.where(at[None, :] < i2, W1[:, (at - i1).clamp(0, i2 - i1 - 1)],
                                      W[:, at] - err[:, :i] @ U[i1:p, at])
                if keep_p is not None:
                    current = current * keep_p[:, at]
                scale[:, k:k + 1], zero[:, k:k + 1] = minmax_qparams(current, column_spec)
                ready[k] = True
            s, z = scale[:, k:k + 1], zero[:, k:k + 1]
            w = W1[:, i]
            q = quantize(w[:, None], s, z, column_spec)[:, 0]
            if keep_p is not None:
                q = torch.where(keep_p[:, p], q, z[:, 0].to(q.dtype))
            Q[:, p] = q
            e = (w - dequantize(q[:, None], s, z)[:, 0]) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q[:, position], scale, zero


def gptq_quantize(model: nn.Module, batches: Iterable, spec: QuantSpec, forward: Callable = default_forward,
                  names: list[str] | None = None, act: ActQuantSpec | None = None, blocksize: int = 128,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = False) -> nn.Module:
    """GPTQ over the named Linears (default: all but ``lm_head``), layer group by layer group, each from the
    inputs of the model quantized so far; then each becomes a ``QuantLinear`` (in place)."""
    if act is not None and not act.dynamic:
        raise ValueError("static activation ranges are calibrated by the gptq plugin; use a dynamic ActQuantSpec here")
    entries = {}

    def finish(name: str, module: nn.Module, stats: HessianAccumulator) -> None:
        codes, scale, zero = gptq_layer(module.weight, stats.H, spec, blocksize, damp, act_order, static_groups)
        with torch.no_grad():
            module.weight.copy_(dequantize(codes, scale, zero, module.weight.dtype))
        entries[name] = {"codes": codes, "scale": scale, "zero": zero}

    names = find_linear_names(model) if names is None else names
    calibrate_layers(model, names, batches, forward,
                     lambda m: HessianAccumulator(m.in_features, device=m.weight.device), finish)
    replace_with_quant_linears(model, entries, spec, act)
    return model
