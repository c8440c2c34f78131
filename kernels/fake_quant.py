"""``fake_quant``: learnable fake quantization on the shared grid (``trainer/compression/quant.py``), forward
and backward, with either rounding:

- **LSQ** (``v=None``): ŷ = s·(clamp(round(x/s) + z, lo, hi) − z). Straight-through gradients as LSQ
  defines them (Esser et al. 2020, eq. 3): ∂ŷ/∂x = 1 inside the clamp range (lo ≤ x/s + z ≤ hi), else 0;
  ∂ŷ/∂s = round(x/s) − x/s inside, lo − z below and hi − z above; the step-size gradient is multiplied by
  ``grad_scale`` (LSQ's g = 1/√(N·Q_P), 1 by default).
- **AdaRound soft rounding** (``v`` given): ŷ = s·(clamp(⌊x/s⌋ + h(v) + z, lo, hi) − z) with the rectified
  sigmoid h(v) = clamp(σ(v)(ζ − γ) + γ, 0, 1). ∂ŷ/∂v = s·h'(v) inside the clamp range (exact); the floor
  takes the straight-through gradient, so ∂ŷ/∂s = ⌊x/s⌋ + h(v) − x/s inside and lo − z / hi − z outside.

In both, the gradient of the step size is the exact derivative of ŷ with the rounding residual
(round(x/s) − x/s, or ⌊x/s⌋ − x/s) held constant: what the straight-through estimator assumes.

x is (rows, cols); ``scale`` and ``zero`` are (rows, n_groups) — one per output channel (n_groups = 1) or per
group of ``group_size`` consecutive columns, the last one narrower when it does not divide cols (the grid's
convention, ``trainer/compression/quant.py``; ``group_size=None``: cols/n_groups) — or (1, n_groups), shared by
every row (a static activation scale); per-token activations are rows = tokens, n_groups = 1. The zero point
takes no gradient. One ``torch.library`` op (``blocktrain::fake_quant``) with a fake and an autograd formula;
the backward runs on the backend that ran the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocktrain.kernels import dispatch
from blocktrain.trainer.compression.quant import expand_groups, group_width, split_groups

__all__ = ["ZETA", "GAMMA", "fake_quant", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


def _triton():
    from blocktrain.kernels import _fake_quant_triton

    return _fake_quant_triton


def rectified_sigmoid(v: Tensor, zeta: float = ZETA, gamma: float = GAMMA) -> Tensor:
    """AdaRound's h(v) = clamp(σ(v)(ζ − γ) + γ, 0, 1)."""
    return (torch.sigmoid(v) * (zeta - gamma) + gamma).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# the reference: x (R, C), scale/zero (R, G) over groups of g columns, v (R, C) or None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _codes(x, scale, zero, v, g, lo, hi, zeta, gamma):
    """(t = x/s, pre-clamp code u, clamped code q, s, z), all in the compute dtype, expanded to x's shape."""
    dt = _compute_dtype(x)
    s, z = expand_groups(scale.to(dt), x.shape[1], g), expand_groups(zero.to(dt), x.shape[1], g)
    t = x.to(dt) / s
    u = (torch.floor(t) + rectified_sigmoid(v.to(dt), zeta, gamma) if v is not None else torch.round(t)) + z
    return t, u, u.clamp(lo, hi), s, z


def _forward_reference(x, scale, zero, v, g, lo, hi, zeta, gamma):
    _, _, q, s, z = _codes(x, scale, zero, v, g, lo, hi, zeta, gamma)
    return (s * (q - z)).to(x.dtype)


def _backward_reference(grad, x, scale, zero, v, g, lo, hi, zeta, gamma):
    t, u, q, s, z = _codes(x, scale, zero, v, g, lo, hi, zeta, gamma)
    inside = ((u if v is not None else t + z) >= lo) & ((u if v is not None else t + z) <= hi)
    grad = grad.to(t.dtype)
    gx = torch.where(inside, grad, 0)
    gs = grad * (q - z - torch.where(inside, t, 0))
    gv = None
    if v is not None:
        sig = torch.sigmoid(v.to(t.dtype))
        pre = sig * (zeta - gamma) + gamma
        dh = torch.where((pre > 0) & (pre < 1), (zeta - gamma) * sig * (1 - sig), 0)
        gv = (gx * s * dh).to(v.dtype)
    return gx.to(x.dtype), gs, gv


def _forward_triton(x, scale, zero, v, g, lo, hi, zeta, gamma):
    return _triton().forward(x, scale, zero, v, g, lo, hi, zeta, gamma)


def _backward_triton(grad, x, scale, zero, v, g, lo, hi, zeta, gamma):
    return _triton().backward(grad, x, scale, zero, v, g, lo, hi, zeta, gamma)


_FORWARD = {"reference": _forward_reference, "triton": _forward_triton}
_BACKWARD = {"reference": _backward_reference, "triton": _backward_triton}


# --------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("blocktrain::fake_quant", mutates_args=())
def _fake_quant_op(x: Tensor, scale: Tensor, zero: Tensor, v: Tensor | None, group_size: int, lo: int, hi: int,
                   zeta: float, gamma: float, backend: str) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return _FORWARD[backend](x, scale, zero, v, group_size, lo, hi, zeta, gamma)


@_fake_quant_op.register_fake
def _(x, scale, zero, v, group_size, lo, hi, zeta, gamma, backend):
    return torch.empty_like(x)


@torch.library.custom_op("blocktrain::fake_quant_backward", mutates_args=())
def _fake_quant_backward_op(grad: Tensor, x: Tensor, scale: Tensor, zero: Tensor, v: Tensor | None, group_size: int,
                            lo: int, hi: int, zeta: float, gamma: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, the per-element terms of grad_scale (fp32 or fp64, x's shape), grad_v (empty without v))."""
    with torch.autocast(x.device.type, enabled=False):
        gx, gs, gv = _BACKWARD[backend](grad.contiguous(), x, scale, zero, v, group_size, lo, hi, zeta, gamma)
    return gx, gs, x.new_empty(0) if gv is None else gv


@_fake_quant_backward_op.register_fake
def _(grad, x, scale, zero, v, group_size, lo, hi, zeta, gamma, backend):
    gv = x.new_empty(0) if v is None else torch.empty_like(v)
    return torch.empty_like(x), torch.empty_like(x, dtype=_compute_dtype(x)), gv


def _setup_context(ctx, inputs, output):
    x, scale, zero, v, group_size, lo, hi, zeta, gamma, backend = inputs
    ctx.save_for_backward(x, scale, zero, v)
    ctx.args = (group_size, lo, hi, zeta, gamma, backend)


def _backward(ctx, grad):
    x, scale, zero, v = ctx.saved_tensors
    gx, gs, gv = torch.ops.blocktrain.fake_quant_backward(grad, x, scale, zero, v, *ctx.args)
    gs = split_groups(gs, ctx.args[0]).sum(-1)
    return (gx, gs.to(scale.dtype), None, gv if v is not None else None, None, None, None, None, None, None)


_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point


def _validate(x: Tensor, scale: Tensor, zero: Tensor, v: Tensor | None, lo: int, hi: int,
              group_size: int | None) -> int:
    """Checks the arguments; returns the group width."""
    if x.dim() != 2:
        raise ValueError(f"fake_quant: x must be (rows, cols), got {tuple(x.shape)}")
    rows, cols = x.shape
    if scale.dim() != 2 or scale.shape[0] not in (1, rows) or (group_size is None and cols % scale.shape[1]):
        raise ValueError(f"fake_quant: scale must be ({rows} or 1, n_groups) with n_groups dividing {cols} (or "
                         f"n_groups = ⌈{cols}/group_size⌉ given group_size), got {tuple(scale.shape)}")
    try:
        g = group_width(cols, scale.shape[1], group_size)
    except ValueError as exc:
        raise ValueError(f"fake_quant: {exc}") from None
    if zero.shape != scale.shape:
        raise ValueError(f"fake_quant: zero must have scale's shape {tuple(scale.shape)}, got {tuple(zero.shape)}")
    if v is not None and v.shape != x.shape:
        raise ValueError(f"fake_quant: v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
    if lo >= hi:
        raise ValueError(f"fake_quant: need lo < hi, got {lo}, {hi}")
    return g


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def fake_quant(x: Tensor, scale: Tensor, zero: Tensor, lo: int, hi: int, v: Tensor | None = None,
               grad_scale: float = 1.0, zeta: float = ZETA, gamma: float = GAMMA,
               group_size: int | None = None) -> Tensor:
    """Fake-quantize ``x`` (rows, cols) on the grid ``scale``/``zero`` ((rows or 1), n_groups) with codes in
    [lo, hi]: round to nearest with LSQ's straight-through gradients, or AdaRound's soft rounding h(``v``).
    ``group_size``: columns per group (n_groups = ⌈cols/g⌉); None: cols/n_groups, equal groups.

    Gradients flow to ``x``, ``scale`` (times ``grad_scale``) and ``v``; not to ``zero``.
    """
    g = _validate(x, scale, zero, v, lo, hi, group_size)
    backend = dispatch.select(x.device, x.dtype)
    dispatch.announce("fake_quant", backend)
    if grad_scale != 1.0:
        scale = _GradScale.apply(scale, float(grad_scale))
    scale = scale.to(_compute_dtype(x))  # a shared row's gradient is summed over the rows in fp32, then cast once
    zero = zero.detach().to(scale.dtype)
    x = x.contiguous()
    v = None if v is None else v.contiguous()
    return torch.ops.blocktrain.fake_quant(x, _rows(scale, x.shape[0]), _rows(zero, x.shape[0]), v, g, int(lo),
                                           int(hi), float(zeta), float(gamma), backend)


def _rows(t: Tensor, rows: int) -> Tensor:
    """A shared (1, G) row expanded to (rows, G) (a view; autograd sums its gradient back)."""
    return t.expand(rows, t.shape[1]) if t.shape[0] == 1 else t
