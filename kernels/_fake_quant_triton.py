"""Triton kernels of ``fake_quant`` (imported lazily: only when the Triton backend runs).

One program per BLOCK elements of the row-major (R, C) input; element (r, c) reads the scale and zero of
group c // g of row r (g the group size; a narrower last group needs nothing else) through their strides (a
shared row has stride 0). Division is IEEE
(``div_rn``) and rounding half to even, as torch's, so both backends pick the same codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocktrain.kernels import dispatch

INTERPRETED = dispatch.interpret_mode()
BLOCK = 1024


@triton.jit
def _round_half_even(t):
    f = tl.floor(t)
    d = t - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return f + tl.where(d > 0.5, 1.0, tl.where(d == 0.5, odd, 0.0))


@triton.jit
def _load(x_ptr, s_ptr, z_ptr, v_ptr, offs, ok, C, GSZ, s_r, s_g, z_r, z_g, zeta, gamma, HAS_V: tl.constexpr):
    """(t = x/s, pre-clamp code u, s, z, σ(v)) of the elements ``offs``."""
    row = offs // C
    grp = (offs % C) // GSZ
    s = tl.load(s_ptr + row * s_r + grp * s_g, mask=ok, other=1.0).to(tl.float32)
    z = tl.load(z_ptr + row * z_r + grp * z_g, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    t = tl.math.div_rn(x, s)
    sig = t * 0.0
    if HAS_V:
        sig = tl.sigmoid(tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32))
        u = tl.floor(t) + tl.minimum(tl.maximum(sig * (zeta - gamma) + gamma, 0.0), 1.0) + z
    else:
        u = _round_half_even(t) + z
    return t, u, s, z, sig


@triton.jit
def _forward_kernel(x_ptr, s_ptr, z_ptr, v_ptr, y_ptr, N, C, GSZ, s_r, s_g, z_r, z_g, lo, hi, zeta, gamma,
                    HAS_V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t, u, s, z, sig = _load(x_ptr, s_ptr, z_ptr, v_ptr, offs, ok, C, GSZ, s_r, s_g, z_r, z_g, zeta, gamma, HAS_V)
    q = tl.minimum(tl.maximum(u, lo), hi)
    tl.store(y_ptr + offs, (s * (q - z)).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, s_ptr, z_ptr, v_ptr, gx_ptr, gs_ptr, gv_ptr, N, C, GSZ, s_r, s_g, z_r, z_g,
                     lo, hi, zeta, gamma, HAS_V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    t, u, s, z, sig = _load(x_ptr, s_ptr, z_ptr, v_ptr, offs, ok, C, GSZ, s_r, s_g, z_r, z_g, zeta, gamma, HAS_V)
    q = tl.minimum(tl.maximum(u, lo), hi)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_V:
        arg = u
    else:
        arg = t + z
    inside = (arg >= lo) & (arg <= hi)
    gx = tl.where(inside, g, 0.0)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=ok)
    tl.store(gs_ptr + offs, g * (q - z - tl.where(inside, t, 0.0)), mask=ok)
    if HAS_V:
        pre = sig * (zeta - gamma) + gamma
        dh = tl.where((pre > 0.0) & (pre < 1.0), (zeta - gamma) * sig * (1.0 - sig), 0.0)
        tl.store(gv_ptr + offs, (gx * s * dh).to(gv_ptr.dtype.element_ty), mask=ok)


def _check_device(*tensors: torch.Tensor) -> None:
    if not INTERPRETED and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError("the Triton kernels were built for the GPU (TRITON_INTERPRET was not set when they were "
                           "first used) and cannot take CPU tensors; set TRITON_INTERPRET=1 before importing")


def _launch(x, scale, zero, group_size):
    rows, cols = x.shape
    return ((triton.cdiv(x.numel(), BLOCK),), (x.numel(), cols, group_size, scale.stride(0), scale.stride(1),
                                               zero.stride(0), zero.stride(1)))


def forward(x, scale, zero, v, group_size, lo, hi, zeta, gamma):
    """The fake-quantized x (rows, cols), in x's dtype; x and v contiguous."""
    _check_device(x, scale, zero)
    y = dispatch.empty(x.shape, x.dtype, x.device)
    grid, dims = _launch(x, scale, zero, group_size)
    _forward_kernel[grid](x, scale, zero, x if v is None else v, y, *dims, float(lo), float(hi), zeta, gamma,
                          HAS_V=v is not None, BLOCK=BLOCK)
    return y


def backward(g, x, scale, zero, v, group_size, lo, hi, zeta, gamma):
    """(grad_x in x's dtype, per-element grad_scale terms in fp32, grad_v in v's dtype or None)."""
    _check_device(g, x, scale, zero)
    gx = dispatch.empty(x.shape, x.dtype, x.device)
    gs = dispatch.empty(x.shape, torch.float32, x.device)
    gv = None if v is None else dispatch.empty(v.shape, v.dtype, v.device)
    grid, dims = _launch(x, scale, zero, group_size)
    _backward_kernel[grid](g, x, scale, zero, x if v is None else v, gx, gs, gs if gv is None else gv, *dims,
                           float(lo), float(hi), zeta, gamma, HAS_V=v is not None, BLOCK=BLOCK)
    return gx, gs, gv
