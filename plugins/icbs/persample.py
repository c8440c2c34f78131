"""Per-sample gradients of one Linear from a single backward, through hooks.

For y = x Wᵀ + b and a loss Σ_n ℓ_n over independent samples n, sample n's gradient is
∇_W ℓ_n = Σ_t δ_{n,t} x_{n,t}ᵀ with δ = ∂(Σ_n ℓ_n)/∂y; a block of weights (row r_i, column c_i) needs
only G[n, i] = Σ_t δ_{n,t,r_i} x_{n,t,c_i}.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["capture_io_grads", "split_batch", "mean_weight_grad", "per_sample_block_grads"]


def capture_io_grads(model: nn.Module, module: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                     batch: Any, micro_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x [N, T, in] and output gradients δ [N, T, out] (fp32) of ``module`` for ``loss_fn(model, batch)``.

    ``loss_fn`` returns one loss per sample, shape [N]; the module's inputs must have the samples first.
    Calls of the module within one forward are concatenated along T. The model's parameters are frozen meanwhile,
    so autograd keeps only what lies downstream of the module; ``micro_batch`` samples at a time bound the
    activation memory (the samples are independent, so the result is the same).
    """
    chunks = split_batch(batch, micro_batch) if micro_batch is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        parts = [_capture(model, module, loss_fn, chunk) for chunk in (chunks or [batch])]
    finally:
        for p in params:
            p.requires_grad_(True)
    return torch.cat([x for x, _ in parts]), torch.cat([d for _, d in parts])


def split_batch(batch: Any, size: int) -> list[Any] | None:
    """``batch`` cut into chunks of ``size`` samples along dim 0 of every tensor (in mappings, tuples and
    lists; other values shared); None when it holds no tensor to cut."""
    if torch.is_tensor(batch):
        return list(batch.split(size)) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        keys, values = list(batch), list(batch.values())
        parts = split_batch(values, size)
        return None if parts is None else [dict(zip(keys, part)) for part in parts]
    if isinstance(batch, (tuple, list)):
        cut = [split_batch(v, size) for v in batch]
        counts = {len(c) for c in cut if c is not None}
        if not counts:
            return None
        if len(counts) > 1:
            raise ValueError(f"the batch's tensors hold different numbers of samples: cannot cut it into {size}s")
        n = counts.pop()
        return [type(batch)(v if c is None else c[i] for v, c in zip(batch, cut)) for i in range(n)]
    return None


def _capture(model, module, loss_fn, batch) -> tuple[torch.Tensor, torch.Tensor]:
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(mod, args, out):
        inputs.append(args[0].detach())
        outputs.append(out.detach().requires_grad_(True))
        return outputs[-1].clone()  # a non-leaf, so in-place ops after the layer stay legal

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            losses = loss_fn(model, batch)
    finally:
        handle.remove()
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return one loss per sample (shape [N]), got shape {tuple(losses.shape)}")
    if not outputs:
        raise ValueError("the target layer did not run in loss_fn's forward")
    n = losses.shape[0]
    if any(x.shape[0] != n for x in inputs):
        raise ValueError(f"the layer's inputs must have the {n} samples as their first dimension")
    grads = (torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if losses.requires_grad
             else [None] * len(outputs))
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
    x = torch.cat([i.reshape(n, -1, i.shape[-1]).float() for i in inputs], dim=1)
    delta = torch.cat([g.reshape(n, -1, g.shape[-1]).float() for g in grads], dim=1)
    return x, delta


def mean_weight_grad(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the per-sample weight gradients, [out, in]."""
    return delta.flatten(0, 1).T @ x.flatten(0, 1) / x.shape[0]


def per_sample_block_grads(x: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                           max_elems: int = 1 << 26) -> torch.Tensor:
    """G [N, b]: sample n's gradient of the weights (rows[i], cols[i]), in chunks of ≤ ``max_elems`` products."""
    n, t, _ = x.shape
    chunk = max(1, max_elems // (n * t))
    return torch.cat([(delta[:, :, rows[s:s + chunk]] * x[:, :, cols[s:s + chunk]]).sum(1)
                      for s in range(0, rows.numel(), chunk)], dim=1)
