"""Triton kernels of ``lora_linear`` (imported lazily: only when the Triton backend runs).

Dropout is drawn in-kernel with ``tl.rand(seed, offset)``, offset = row * in_features + column of
the logical (M, in) input, so the forward, the backward and :func:`keep_mask` see one mask without
storing it. The dense GEMMs (``x·Wᵀ``, ``g·W``, ``gBᵀ·xs``) stay on torch (cuBLAS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocktrain.kernels import dispatch

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = dispatch.interpret_mode()


@triton.jit
def _keep(seed, rows, cols, n_cols, p):
    """Dropout keep-mask for elements (rows × cols) of a row-major (·, n_cols) input."""
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def _down_kernel(x_ptr, a_ptr, xs_ptr, u_ptr, seed_ptr,
                 M, K, R, n_blocks, stride_xm, stride_ar, stride_ak, stride_sm, p, scale,
                 HAS_DROPOUT: tl.constexpr, STORE_XS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """xs = Σ_j dropout(x)_j (M, K) and u = xs·Aᵀ (M, R, fp32), one pass over x."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        ok = row_ok[:, None] & col_ok[None, :]
        xs = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for j in range(n_blocks):
            c = j * K + cols
            xt = tl.load(x_ptr + rows64[:, None] * stride_xm + c[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_DROPOUT:
                xt = tl.where(_keep(seed, rows, c, n_blocks * K, p), xt, 0.0)
            xs += xt
        if HAS_DROPOUT:
            xs = xs * scale
        if STORE_XS:
            tl.store(xs_ptr + rows64[:, None] * stride_sm + cols[None, :], xs.to(xs_ptr.dtype.element_ty), mask=ok)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        u += tl.dot(xs, a_t, input_precision="ieee")
    tl.store(u_ptr + rows64[:, None] * R + rr[None, :], u, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _up_grad_kernel(g_ptr, b_ptr, u_ptr, gb_ptr, part_ptr,
                    M, N, R, stride_gm, stride_bn, stride_br,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """gB = g·B (M, R) and this row block's share of gᵀ·u (N, R), one pass over g."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    u = tl.load(u_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    gb = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        gb += tl.dot(g, b, input_precision="ieee")
        part = tl.dot(tl.trans(g), u, input_precision="ieee")
        tl.store(part_ptr + (pid * N + cols[:, None]).to(tl.int64) * R + rr[None, :], part,
                 mask=col_ok[:, None] & r_ok[None, :])
    tl.store(gb_ptr + rows64[:, None] * R + rr[None, :], gb, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _dx_kernel(gb_ptr, a_ptr, dx_ptr, seed_ptr,
               M, K, R, n_blocks, stride_ar, stride_ak, stride_dm, p, coef,
               HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """dx[:, jK + c] = coef · keep · (gB·A)[:, c] for every block j: the LoRA part of grad_x."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    gb = tl.load(gb_ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    t = tl.dot(gb, a, input_precision="ieee") * coef
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    ok = row_ok[:, None] & col_ok[None, :]
    for j in range(n_blocks):
        c = j * K + cols
        v = t
        if HAS_DROPOUT:
            v = tl.where(_keep(seed, rows, c, n_blocks * K, p), t, 0.0)
        tl.store(dx_ptr + rows64[:, None] * stride_dm + c[None, :], v.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mask_kernel(mask_ptr, seed_ptr, M, N, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the kernels above draw, as uint8 (tests)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    keep = _keep(tl.load(seed_ptr), rows, cols, N, p)
    tl.store(mask_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.uint8), mask=ok)


def _block(n: int, cap: int | None = None) -> int:
    """A power-of-two tile ≥ 16 (tl.dot's minimum) covering n, at most ``cap``."""
    size = triton.next_power_of_2(n)
    return max(16, size if cap is None else min(cap, size))


def _check_device(*tensors: torch.Tensor) -> None:
    if not INTERPRETED and any(t.device.type != "cuda" for t in tensors):
        raise RuntimeError("the Triton kernels were built for the GPU (TRITON_INTERPRET was not set when they were "
                           "first used) and cannot take CPU tensors; set TRITON_INTERPRET=1 before importing")


def down(x2d: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor | None, n_blocks: int, p: float,
         store_xs: bool = True, block_m: int = 32) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(xs, u): chunk-sum of dropout(x) (M, K) in x's dtype (None unless ``store_xs``) and xs·Aᵀ (M, R) in fp32."""
    _check_device(x2d, lora_a)
    (m, _), (r, k) = x2d.shape, lora_a.shape
    xs = dispatch.empty((m, k), x2d.dtype, x2d.device) if store_xs else None
    u = dispatch.empty((m, r), torch.float32, x2d.device)
    _down_kernel[(triton.cdiv(m, block_m),)](
        x2d, lora_a, u if xs is None else xs, u, u if seed is None else seed,
        m, k, r, n_blocks, x2d.stride(0), lora_a.stride(0), lora_a.stride(1), k if xs is None else xs.stride(0),
        p, 1.0 / (1.0 - p), HAS_DROPOUT=seed is not None, STORE_XS=store_xs,
        BLOCK_M=block_m, BLOCK_K=_block(k, 128), BLOCK_R=_block(r))
    return xs, u


def up_grad(g2d: torch.Tensor, lora_b: torch.Tensor, u: torch.Tensor,
            block_m: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(gB, gᵀ·u): g·B (M, R) and the unscaled grad of B (N, R), both fp32."""
    _check_device(g2d, lora_b, u)
    (m, n), r = g2d.shape, lora_b.shape[1]
    blocks = triton.cdiv(m, block_m)
    gb = dispatch.empty((m, r), torch.float32, g2d.device)
    parts = dispatch.empty((blocks, n, r), torch.float32, g2d.device)
    _up_grad_kernel[(blocks,)](
        g2d, lora_b, u, gb, parts, m, n, r, g2d.stride(0), lora_b.stride(0), lora_b.stride(1),
        BLOCK_M=block_m, BLOCK_N=_block(n, 64), BLOCK_R=_block(r))
    return gb, parts.sum(0)


def dx(gb: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor | None, n_blocks: int, p: float,
       coef: float, dtype: torch.dtype, block_m: int = 32) -> torch.Tensor:
    """coef · keep ⊙ tile(gB·A, n_blocks): the LoRA part of grad_x, (M, n_blocks·K) in ``dtype``."""
    _check_device(gb, lora_a)
    m, (r, k) = gb.shape[0], lora_a.shape
    out = dispatch.empty((m, n_blocks * k), dtype, gb.device)
    block_k = _block(k, 64)
    _dx_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        gb, lora_a, out, gb if seed is None else seed,
        m, k, r, n_blocks, lora_a.stride(0), lora_a.stride(1), out.stride(0), p, coef,
        HAS_DROPOUT=seed is not None, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block(r))
    return out


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The (rows, cols) keep-mask (uint8, 1 = keep) that the kernels draw for ``seed`` and ``p``."""
    _check_device(seed)
    out = dispatch.empty((rows, cols), torch.uint8, seed.device)
    _mask_kernel[(triton.cdiv(rows, 32), triton.cdiv(cols, 64))](out, seed, rows, cols, p, BLOCK_M=32, BLOCK_N=64)
    return out
