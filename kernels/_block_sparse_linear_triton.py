"""Triton kernels of ``block_sparse_linear`` (imported lazily: only when the Triton backend runs).

``bsr_matmul`` computes y = x·Wᵀ over a BSR weight (one program per row tile and block row, looping over that
row's stored blocks), or with ``transpose`` g·W over the column-major layout of the same blocks; ``block_grad`` the
gradient of every stored block, gᵀ·x restricted to it (one program per block, looping over the row tiles).
Block sides are powers of two ≥ 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocktrain.kernels import dispatch

INTERPRETED = dispatch.interpret_mode()


@triton.jit
def _bsr_kernel(x_ptr, v_ptr, ptr_ptr, idx_ptr, y_ptr, M, stride_xm, stride_ym, s_in, s_out,
                BLOCK_M: tl.constexpr, B_IN: tl.constexpr, B_OUT: tl.constexpr):
    """y[:, b·B_OUT:(b+1)·B_OUT] = Σ_j x[:, idx_j·B_IN:+B_IN] · w_j, w_j[i, o] = v[j, i·s_in + o·s_out]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    brow = tl.program_id(1)
    ok = rows < M
    rows64 = rows.to(tl.int64)
    ii = tl.arange(0, B_IN)
    oo = tl.arange(0, B_OUT)
    start = tl.load(ptr_ptr + brow)
    end = tl.load(ptr_ptr + brow + 1)
    acc = tl.zeros((BLOCK_M, B_OUT), dtype=tl.float32)
    for j in range(start, end):
        c = tl.load(idx_ptr + j).to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + (c * B_IN + ii)[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        wt = tl.load(v_ptr + j * (B_IN * B_OUT) + ii[:, None] * s_in + oo[None, :] * s_out).to(tl.float32)
        acc += tl.dot(xt, wt, input_precision="ieee")
    cols = brow.to(tl.int64) * B_OUT + oo
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _grad_kernel(g_ptr, x_ptr, rows_ptr, col_ptr, gv_ptr, M, stride_gm, stride_xm,
                 BLOCK_M: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """gv[j] = g[:, row_j·R:+R]ᵀ · x[:, col_j·C:+C]."""
    j = tl.program_id(0)
    r = tl.load(rows_ptr + j).to(tl.int64)
    c = tl.load(col_ptr + j).to(tl.int64)
    rr = tl.arange(0, R)
    cc = tl.arange(0, C)
    acc = tl.zeros((R, C), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = rows < M
        rows64 = rows.to(tl.int64)
        gt = tl.load(g_ptr + rows64[:, None] * stride_gm + (r * R + rr)[None, :], mask=ok[:, None], other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xm + (c * C + cc)[None, :], mask=ok[:, None], other=0.0)
        acc += tl.dot(tl.trans(gt.to(tl.float32)), xt.to(tl.float32), input_precision="ieee")
    tl.store(gv_ptr + j.to(tl.int64) * (R * C) + rr[:, None] * C + cc[None, :], acc.to(gv_ptr.dtype.element_ty))


def _check(*tensors: torch.Tensor) -> None:
    if not INTERPRETED and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError("the Triton kernels were built for the GPU (TRITON_INTERPRET was not set when they were "
                           "first used) and cannot take CPU tensors; set TRITON_INTERPRET=1 before importing")


def bsr_matmul(x2d: torch.Tensor, values: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, width: int,
               transpose: bool, block_m: int = 32) -> torch.Tensor:
    """x·Wᵀ (M, width) for the row-major BSR layout, or with ``transpose`` g·W for the column-major one."""
    _check(x2d, values)
    m = x2d.shape[0]
    _, r, c = values.shape
    b_in, b_out, s_in, s_out = (r, c, c, 1) if transpose else (c, r, 1, c)
    y = dispatch.empty((m, width), x2d.dtype, x2d.device)
    _bsr_kernel[(triton.cdiv(m, block_m), width // b_out)](
        x2d, values.contiguous(), ptr, idx, y, m, x2d.stride(0), y.stride(0), s_in, s_out,
        BLOCK_M=block_m, B_IN=b_in, B_OUT=b_out)
    return y


def block_grad(g2d: torch.Tensor, x2d: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape,
               block_m: int = 32) -> torch.Tensor:
    """The gradient of every stored block (nnzb, R, C)."""
    _check(g2d, x2d)
    nnzb, r, c = shape
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    gv = dispatch.empty((nnzb, r, c), x2d.dtype, x2d.device)
    if nnzb:
        _grad_kernel[(nnzb,)](g2d, x2d, rows, col, gv, g2d.shape[0], g2d.stride(0), x2d.stride(0),
                              BLOCK_M=block_m, R=r, C=c)
    return gv
