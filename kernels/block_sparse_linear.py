"""``block_sparse_linear``: y = x·Wᵀ + b with W (out, in) stored as R×C blocks in BSR form, forward and backward.

A weight is ``values`` (nnzb, R, C), ``crow`` (out/R + 1) and ``col`` (nnzb) as torch's BSR layout, blocks in
row-major order. Gradients flow to ``values`` (and ``x``, ``bias``) only: a block that is not stored cannot come
back. Paths, chosen by ``kernels.dispatch``:

- ``compiled`` (CPU, block sides multiples of 16, where a C++ compiler builds it): ``_block_sparse_linear_c``, a
  threaded, cache-blocked AVX loop over the stored blocks only, for y, the input gradient (the same loop over the
  column-major layout) and the block gradients; fp32 (bf16/fp16 inputs run in fp32). On this machine it runs the
  DeiT-B MLP shapes at 50% block density 1.4-2.0x faster than torch's dense matmul (1.7-1.9x at 32x32) and
  4.5-5.9x faster than torch's BSR matmul (benchmarks/RESULTS.md), so ``auto`` picks it on the CPU;
- ``reference`` (other CPU blocks, no compiler, ``BLOCKTRAIN_KERNELS=reference``, and any device without Triton):
  torch's sparse BSR matmul for y and the input gradient (over the transposed layout), fp32 (torch has no
  bf16/fp16 BSR kernel on CPU); the block gradients are gathered from the dense gᵀ·x;
- ``triton`` (CUDA, or ``TRITON_INTERPRET=1``): one program per (row tile, block row) looping over that row's
  blocks with ``tl.dot``; the input gradient runs the same kernel over the transposed (column-major) layout, the
  block gradient one program per stored block over the row tiles. Block sides must be ≥ 16 (``tl.dot``).

One ``torch.library`` op (``blocktrain::block_sparse_linear``) with a fake and an autograd formula.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from blocktrain.kernels import _block_sparse_linear_c, dispatch

__all__ = ["to_bsr", "from_bsr", "block_sparse_linear"]

def to_bsr(weight: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """(values, crow, col) of the blocks of ``weight`` (out, in) that hold a non-zero; the block must tile it."""
    out, inp = weight.shape
    r, c = block
    if out % r or inp % c:
        raise ValueError(f"block {r}x{c} does not tile a {out}x{inp} weight; BSR needs both sides divisible")
    tiles = weight.reshape(out // r, r, inp // c, c).transpose(1, 2)  # (nR, nC, R, C)
    present = tiles.ne(0).any(-1).any(-1)
    rows, cols = present.nonzero(as_tuple=True)
    crow = torch.zeros(out // r + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = present.sum(1).cumsum(0)
    return tiles[rows, cols].contiguous(), crow, cols.contiguous()


def from_bsr(values: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int]) -> Tensor:
    """The dense (out, in) weight."""
    r, c = values.shape[1:]
    dense = values.new_zeros(shape[0] // r, shape[1] // c, r, c)
    dense[_block_rows(crow), col] = values
    return dense.transpose(1, 2).reshape(shape)


def _block_rows(crow: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())


def _transposed(values: Tensor, crow: Tensor, col: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, crow, col) of Wᵀ: the blocks transposed, in column-major order of W."""
    perm = torch.argsort(col, stable=True)
    ccol = torch.zeros(n_cols + 1, dtype=torch.int64, device=col.device)
    ccol[1:] = torch.bincount(col, minlength=n_cols).cumsum(0)
    return values[perm].transpose(1, 2), ccol, _block_rows(crow)[perm]


# --------------------------------------------------------------------------------------------
# reference: torch's BSR matmul (fp32), block gradients gathered from the dense gᵀ·x


def _bsr_times(values: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int], x2: Tensor) -> Tensor:
    """x·Wᵀ via torch's sparse BSR matmul, in fp32 where torch has no kernel for the dtype; MKL takes square blocks
    only, so an R×C weight is re-blocked at gcd(R, C) first."""
    dtype = x2.dtype if x2.dtype in (torch.float32, torch.float64) else torch.float32
    r, c = values.shape[1:]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (BSR tensor support is in beta|invariant checks)")
        if r == c:
            weight = torch.sparse_bsr_tensor(crow, col, values.to(dtype).contiguous(), size=shape)
        else:
            side = math.gcd(r, c)
            weight = from_bsr(values.to(dtype), crow, col, shape).to_sparse_bsr((side, side))
        return (weight @ x2.to(dtype).t()).t().to(x2.dtype)


def _forward_reference(x2: Tensor, values: Tensor, crow: Tensor, col: Tensor, out: int, bias: Tensor | None) -> Tensor:
    y = _bsr_times(values, crow, col, (out, x2.shape[1]), x2)
    return y if bias is None else y + bias


def _backward_reference(g2: Tensor, x2: Tensor, values: Tensor, crow: Tensor, col: Tensor, need_x: bool):
    (m, out), inp = g2.shape, x2.shape[1]
    _, r, c = values.shape
    gx = None
    if need_x:
        gx = _bsr_times(*_transposed(values, crow, col, inp // c), (inp, out), g2)
    dense = (g2.t() @ x2).view(out // r, r, inp // c, c).transpose(1, 2)
    return gx, dense[_block_rows(crow), col].to(values.dtype)


# --------------------------------------------------------------------------------------------
# triton


def _triton():
    from blocktrain.kernels import _block_sparse_linear_triton

    return _block_sparse_linear_triton


def _forward_triton(x2, values, crow, col, out, bias):
    y = _triton().bsr_matmul(x2, values, crow, col, out, transpose=False)
    return y if bias is None else y + bias


def _backward_triton(g2, x2, values, crow, col, need_x):
    tri = _triton()
    gx = None
    if need_x:  # the same kernel over the column-major layout: gx = g·W
        vt, ccol, rows = _transposed(values, crow, col, x2.shape[1] // values.shape[2])
        gx = tri.bsr_matmul(g2, vt.transpose(1, 2), ccol, rows, x2.shape[1], transpose=True)
    return gx, tri.block_grad(g2, x2, crow, col, values.shape)


# --------------------------------------------------------------------------------------------
# compiled (CPU): fp32


def _fp32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _forward_compiled(x2, values, crow, col, out, bias):
    y = _block_sparse_linear_c.forward(_fp32(x2), _fp32(values), crow, col, None if bias is None else _fp32(bias), out)
    return y.to(x2.dtype)


def _backward_compiled(g2, x2, values, crow, col, need_x):
    g, x, v = _fp32(g2), _fp32(x2), _fp32(values)
    gx = _block_sparse_linear_c.backward_x(g, v, crow, col, x.shape[1]).to(x2.dtype) if need_x else None
    return gx, _block_sparse_linear_c.backward_values(g, x, crow, col, tuple(values.shape[1:])).to(values.dtype)


def _compiled_fits(values: Tensor, x: Tensor) -> bool:
    """Block sides are whole 16-float vectors and x is a float type the loop runs in fp32."""
    return values.shape[1] % 16 == 0 and values.shape[2] % 16 == 0 and x.dtype in _COMPILED_DTYPES


_COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_FORWARD = {"reference": _forward_reference, "triton": _forward_triton, "compiled": _forward_compiled}
_BACKWARD = {"reference": _backward_reference, "triton": _backward_triton, "compiled": _backward_compiled}


# --------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("blocktrain::block_sparse_linear", mutates_args=())
def _op(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None, out_features: int,
        backend: str) -> Tensor:
    lead, width = x.shape[:-1], x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        y = _FORWARD[backend](x.reshape(-1, width).contiguous(), values, crow, col, out_features, bias)
    return y.view(*lead, out_features)


@_op.register_fake
def _(x, values, crow, col, bias, out_features, backend):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("blocktrain::block_sparse_linear_backward", mutates_args=())
def _backward_op(grad_y: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor, backend: str,
                 need_x: bool) -> tuple[Tensor, Tensor]:
    width, out = x.shape[-1], grad_y.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        gx, gv = _BACKWARD[backend](grad_y.reshape(-1, out).contiguous(), x.reshape(-1, width).contiguous(), values,
                                    crow, col, need_x)
    return (x.new_empty(0) if gx is None else gx.view(x.shape)), gv


@_backward_op.register_fake
def _(grad_y, x, values, crow, col, backend, need_x):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), torch.empty_like(values)


def _setup_context(ctx, inputs, output):
    x, values, crow, col, bias, _, backend = inputs
    ctx.save_for_backward(x, values, crow, col)
    ctx.backend = backend


def _backward(ctx, grad_y):
    x, values, crow, col = ctx.saved_tensors
    need_x, need_v, _, _, need_bias = ctx.needs_input_grad[:5]
    gx, gv = torch.ops.blocktrain.block_sparse_linear_backward(grad_y, x, values, crow, col, ctx.backend, need_x)
    gbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need_bias else None
    return (gx if need_x else None), (gv if need_v else None), None, None, gbias, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_linear(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Tensor | None = None,
                        out_features: int | None = None) -> Tensor:
    """x (..., in) times the BSR weight (``values``, ``crow``, ``col``) transposed, plus ``bias``: (..., out)."""
    r, c = values.shape[1:]
    out = (crow.numel() - 1) * r if out_features is None else out_features
    compiled = _block_sparse_linear_c.available if _compiled_fits(values, x) else None
    backend = dispatch.select(x.device, x.dtype, compiled=compiled)
    if backend == "triton" and min(r, c) < 16:
        backend = "reference"  # tl.dot needs block sides >= 16
    dispatch.announce("block_sparse_linear", backend)
    return _op(x, values, crow, col, bias, out, backend)
