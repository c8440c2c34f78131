"""Triton kernel of ``quant_matmul`` (imported lazily: only when the Triton backend runs).

Each program computes a (BLOCK_M, BLOCK_N) tile of y; per BLOCK_K step it loads the int32 words that hold a
(BLOCK_K, BLOCK_N) tile of codes, shifts and masks the codes out, dequantizes them with their group's (column
k // group_size: a narrower last group needs nothing else) scale and zero point in fp32 and feeds them to
``tl.dot`` with fp32 accumulation (fp32 inputs: exact ``ieee`` products; bf16/fp16 inputs: tf32 tensor-core
products, in which x is exact). The dequantized weight never reaches global memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocktrain.kernels import dispatch

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = dispatch.interpret_mode()


@triton.jit
def _kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
            M, N, K, group_size, stride_xm, stride_wn, stride_sn, stride_ym,
            BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    per_word: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        tile_ok = k_ok[:, None] & col_ok[None, :]
        words = tl.load(w_ptr + cols64[None, :] * stride_wn + (ks // per_word)[:, None], mask=tile_ok, other=0)
        codes = (words >> ((ks % per_word) * BITS)[:, None]) & ((1 << BITS) - 1)
        groups = cols64[None, :] * stride_sn + (ks // group_size)[:, None]
        scale = tl.load(s_ptr + groups, mask=tile_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + groups, mask=tile_ok, other=0.0).to(tl.float32)
        w = scale * (codes.to(tl.float32) - zero)
        if x_ptr.dtype.element_ty == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:  # a bf16/fp16 x is exact in tf32, and ŵ keeps more bits there than in x's dtype
            acc += tl.dot(x, w, input_precision="tf32")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _block(n: int, cap: int) -> int:
    """A power-of-two tile ≥ 16 (tl.dot's minimum) covering n, at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def quant_matmul(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """y (M, N) in x's dtype for x (M, K) with unit column stride; see ``quant_matmul.quant_matmul``."""
    if not INTERPRETED and any(t.device.type != "cuda" for t in (x2d, packed, scale, zero)):
        raise RuntimeError("the Triton kernels were built for the GPU (TRITON_INTERPRET was not set when they were "
                           "first used) and cannot take CPU tensors; set TRITON_INTERPRET=1 before importing")
    (m, k), n = x2d.shape, packed.shape[0]
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()
    y = dispatch.empty((m, n), x2d.dtype, x2d.device)
    block_m, block_n = _block(m, 64), _block(n, 64)
    _kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x2d, packed, scale, zero, y if bias is None else bias, y,
        m, n, k, group_size, x2d.stride(0), packed.stride(0), scale.stride(0), y.stride(0),
        BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64)
    return y
