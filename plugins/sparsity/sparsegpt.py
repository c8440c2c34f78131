"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates, column block by column block.

The Hessian and its damped Cholesky inverse come from the shared ``compression.hessian``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from blocktrain.trainer.compression.hessian import HessianAccumulator, cholesky_inverse_upper
from blocktrain.trainer.compression.masks import find_linear_names, keep_count, parse_pattern
from blocktrain.trainer.compression.replay import calibrate_layers, default_forward

__all__ = ["sparsegpt_layer", "sparsegpt_prune"]


@torch.no_grad()
def sparsegpt_layer(weight: torch.Tensor, H: torch.Tensor, density: float = 0.5, pattern: str = "layer",
                    blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight [out, in] given its input Hessian [in, in]. Returns (updated weight, keep-mask).

    ``pattern="layer"``: in each block of ``blocksize`` columns the weights with the smallest w²/[H⁻¹]²_jj
    are pruned, as many as keep the layer's density exact (round(numel·density) kept); ``"N:M"``: the N
    largest-saliency of every M inputs are kept. Each pruned column's error is spread over the later
    columns through the inverse-Hessian factor (OBS update).
    """
    kind, nm = parse_pattern(pattern)
    if kind == "row":
        raise ValueError("sparsegpt supports pattern 'layer' or 'N:M', not 'row'")
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if nm is not None and (cols % nm[1] or blocksize % nm[1]):
        raise ValueError(f"N:M pattern {pattern!r} needs the input size ({cols}) and blocksize ({blocksize}) "
                         f"to be multiples of {nm[1]}")
    W[:, H.diagonal() == 0] = 0
    U = cholesky_inverse_upper(H.to(W.device), damp)
    pruned = torch.zeros_like(W, dtype=torch.bool)

    def n_pruned_before(c: int) -> int:
        return rows * c - keep_count(rows * c, density) if c else 0

    for c1 in range(0, cols, blocksize):
        c2 = min(c1 + blocksize, cols)
        W1 = W[:, c1:c2].clone()
        U1 = U[c1:c2, c1:c2]
        d = U1.diagonal()
        err = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            n_prune = n_pruned_before(c2) - n_pruned_before(c1)
            saliency = (W1 ** 2 / d[None, :] ** 2).flatten()
            mask1.view(-1)[torch.argsort(saliency, stable=True)[:n_prune]] = True
        for i in range(c2 - c1):
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i:i + nm[1]] ** 2 / d[None, i:i + nm[1]] ** 2
                mask1[:, i:i + nm[1]].scatter_(1, torch.argsort(sal, dim=1, stable=True)[:, :nm[1] - nm[0]], True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], 0.0, w)
            e = (w - q) / d[i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err[:, i] = e
        W[:, c1:c2] = W1
        W[:, c2:] -= err @ U[c1:c2, c2:]
        pruned[:, c1:c2] = mask1
    W[pruned] = 0
    return W.to(weight.dtype), ~pruned


def sparsegpt_prune(model: nn.Module, batches: Iterable, forward: Callable = default_forward, density: float = 0.5,
                    names: list[str] | None = None, pattern: str = "layer", blocksize: int = 128,
                    damp: float = 0.01, sequential: bool = True) -> dict[str, torch.Tensor]:
    """SparseGPT over the named Linears, layer by layer from the model pruned so far (when ``sequential``).

    Updates the weights in place and returns the keep-masks.
    """
    masks: dict[str, torch.Tensor] = {}

    def finish(name: str, module: nn.Module, stats: HessianAccumulator) -> None:
        new, masks[name] = sparsegpt_layer(module.weight, stats.H, density, pattern, blocksize, damp)
        with torch.no_grad():
            module.weight.copy_(new)

    names = find_linear_names(model) if names is None else names
    calibrate_layers(model, names, batches, forward,
                     lambda m: HessianAccumulator(m.in_features, device=m.weight.device), finish, sequential)
    return masks
