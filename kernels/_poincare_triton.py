"""Triton kernel of ``block_mobius_matvec`` (imported lazily: only when the Triton backend runs).

One program per row of x (R, D = G·k). Output o = g·k + i reads block row M[g, i, :] at flat offset o·k and
the inputs x[g·k : g·k + k], as a (D, k) tile; the row's matvec is the tile's row sums. Both norms are scaled
by the row's max |value| (as the reference), and the projection clamps tanh(·) at 1 − eps. fp32 inside.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocktrain.kernels import dispatch


@triton.jit
def _atanh(z):
    return 0.5 * tl.log((1.0 + z) / (1.0 - z))


@triton.jit
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32: norms are floored here


@triton.jit
def _row(x_ptr, m_ptr, row, D, K, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row's offsets, mask, x, u = Mx (block-diagonal M), ‖x‖ (floored) and ‖u‖, the norms overflow-safe."""
    offs_o = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_K)
    ok_o = offs_o < D
    x = tl.load(x_ptr + row * D + offs_o, mask=ok_o, other=0.0).to(tl.float32)
    ok = ok_o[:, None] & (offs_j[None, :] < K)
    xin = tl.load(x_ptr + row * D + (offs_o // K)[:, None] * K + offs_j[None, :], mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs_o[:, None] * K + offs_j[None, :], mask=ok, other=0.0).to(tl.float32)
    mx = tl.sum(m * xin, axis=1)
    xs = tl.maximum(tl.max(tl.abs(x), axis=0), _TINY)
    xn = tl.maximum(tl.sqrt(tl.sum((x / xs) * (x / xs), axis=0)) * xs, _TINY)
    ms = tl.maximum(tl.max(tl.abs(mx), axis=0), _TINY)
    mxn = tl.sqrt(tl.sum((mx / ms) * (mx / ms), axis=0)) * ms
    return offs_o, ok_o, x, mx, xn, mxn


@triton.jit
def _kernel(x_ptr, m_ptr, y_ptr, D, K, sqrt_c, limit, eps, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_o, ok_o, x, mx, xn, mxn = _row(x_ptr, m_ptr, row, D, K, BLOCK_D, BLOCK_K)
    at = _atanh(tl.minimum(xn * sqrt_c, limit))
    t = tl.minimum(_tanh(mxn / xn * at), 1.0 - eps)
    factor = tl.where(mxn > 0, t / (tl.maximum(mxn, _TINY) * sqrt_c), 0.0)
    tl.store(y_ptr + row * D + offs_o, (mx * factor).to(y_ptr.dtype.element_ty), mask=ok_o)


def block_mobius_matvec(blocks: torch.Tensor, x: torch.Tensor, c: float, eps: float) -> torch.Tensor:
    """x (R, G·k), blocks (G, k, k), both contiguous and of one dtype -> (R, G·k)."""
    rows, width = x.shape
    k = blocks.shape[1]
    y = dispatch.empty((rows, width), x.dtype, x.device)
    if rows:
        _kernel[(rows,)](x, blocks, y, width, k, c ** 0.5, 1 - 1e-6, eps,
                         BLOCK_D=triton.next_power_of_2(width), BLOCK_K=triton.next_power_of_2(k))
    return y


@triton.jit
def _backward_kernel(x_ptr, m_ptr, gy_ptr, gu_ptr, gx_ptr, D, K, sqrt_c, limit, eps,
                     BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_o, ok_o, x, mx, s, a = _row(x_ptr, m_ptr, row, D, K, BLOCK_D, BLOCK_K)
    gy = tl.load(gy_ptr + row * D + offs_o, mask=ok_o, other=0.0).to(tl.float32)
    sa = tl.maximum(a, _TINY)
    z = s * sqrt_c
    at = _atanh(tl.minimum(z, limit))
    at_s = tl.where(z > limit, 0.0, sqrt_c / (1.0 - z * z))  # d artanh(√c s)/ds, 0 where clamped
    w = a / s * at
    tw = _tanh(w)
    t = tl.minimum(tw, 1.0 - eps)
    t_w = tl.where(tw > 1.0 - eps, 0.0, 1.0 - tw * tw)  # dt/dw, 0 where projected
    f = t / (sa * sqrt_c)  # y = f · mx
    f_a = (t_w * at / s) / (sa * sqrt_c) - t / (sa * sa * sqrt_c)
    f_s = t_w * a * (at_s * s - at) / (s * s) / (sa * sqrt_c)
    dot = tl.sum(gy * mx, axis=0)
    live = a > 0
    gu = tl.where(live, f * gy + dot * f_a * mx / sa, 0.0)
    gx = tl.where(live, dot * f_s * x / s, 0.0)
    tl.store(gu_ptr + row * D + offs_o, gu, mask=ok_o)
    tl.store(gx_ptr + row * D + offs_o, gx, mask=ok_o)


def block_mobius_matvec_backward(blocks: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, c: float,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d blocks, d x) of ``block_mobius_matvec`` for the upstream ``grad`` (R, G·k). The kernel gives, per row,
    the gradient with respect to u = Mx and the direct term through ‖x‖ (fp32); the two block products
    gx += Mᵀ·gu and gM = Σ_rows gu·xᵀ are batched matmuls."""
    rows, width = x.shape
    g, k, _ = blocks.shape
    gu = dispatch.empty((rows, width), torch.float32, x.device)
    gx = dispatch.empty((rows, width), torch.float32, x.device)
    if rows:
        _backward_kernel[(rows,)](x, blocks, grad.contiguous(), gu, gx, width, k, c ** 0.5, 1 - 1e-6, eps,
                                  BLOCK_D=triton.next_power_of_2(width), BLOCK_K=triton.next_power_of_2(k))
    gu3, x3 = gu.view(rows, g, k), x.float().view(rows, g, k)
    gx = gx + torch.einsum("rgi,gij->rgj", gu3, blocks.float()).reshape(rows, width)
    return torch.einsum("rgi,rgj->gij", gu3, x3).to(blocks.dtype), gx.to(x.dtype)
