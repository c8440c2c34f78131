"""``quant_matmul``: y = x·ŵᵀ + b for a weight stored as packed low-bit integer codes (weight-only quantization).

The weight (out, in) is unsigned b-bit codes u ∈ [0, 2^b) with a scale and a zero point per output row and group
of ``group_size`` consecutive columns (n_groups = ⌈in/g⌉, the last group narrower when g does not divide in; the
grid's convention, ``trainer/compression/quant.py``; ``group_size=None``: in/n_groups, n_groups = 1 per
channel), ŵ = s·(u − z). Codes are packed along the input dimension, 32/b per int32 word, code j of a row at
bits b·(j mod 32/b) of word j // (32/b) — compressed-tensors' ``pack-quantized`` layout for b ∈ {2, 4, 8}, with
codes offset to be unsigned (theirs are signed, u = q + 2^(b−1)).

The Triton kernel dequantizes tiles of the weight in registers and never writes ŵ to memory; the reference
unpacks the whole weight, dequantizes it and calls ``F.linear``. On the CPU, bf16 activations times a 4-bit weight
with equal groups of 32, 64, 128 or 256 inputs and a multiple of 16 outputs can also run torch's own int4 kernel
(``aten._weight_int4pack_mm_for_cpu``, the ``compiled`` backend): :func:`pack_for_cpu` converts the weight once into
that kernel's layout (ŵ = s·(u − 8) + m with m = s·(8 − z), equal to s·(u − z) up to float rounding) and
``quant_matmul(..., cpu_packed=...)`` uses it; otherwise the CPU runs the reference. fp32 activations stay on the
reference: torch's kernel is not vectorised for them (up to 50× slower than the reference here, RESULTS.md). One ``torch.library`` op
(``blocktrain::quant_matmul``) with a fake and a gradient for x (the codes are frozen), so ``torch.compile``
sees one node and adapters can train in front of a packed layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blocktrain.kernels import dispatch
from blocktrain.trainer.compression.quant import group_width, split_groups

__all__ = ["BITS", "dequantize_packed", "pack_codes", "pack_for_cpu", "quant_matmul", "quant_matmul_reference",
           "unpack_codes"]

BITS = (2, 4, 8)
CPU_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes
CPU_INT4_DTYPE = torch.bfloat16  # the activations it is fast for (its fp32 path is far slower: RESULTS.md)


def _triton():
    from blocktrain.kernels import _quant_matmul_triton

    return _quant_matmul_triton


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quant_matmul: bits must be one of {BITS} (codes that tile a 32-bit word), got {bits}")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes (out, in) in [0, 2^bits) → int32 words (out, ⌈in·bits/32⌉), zero-padded at the end."""
    _check_bits(bits)
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise ValueError(f"pack_codes: codes must lie in [0, {2**bits}), got [{int(codes.min())}, {int(codes.max())}]")
    per_word = 32 // bits
    out, width = codes.shape
    padded = F.pad(codes.to(torch.int64), (0, -width % per_word)).view(out, -1, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (padded << shifts).sum(-1)  # disjoint bit fields: the sum is their OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """The inverse of :func:`pack_codes`: int32 words → unsigned codes (out, in_features) as int32."""
    _check_bits(bits)
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts).bitwise_and_(2**bits - 1)
    return codes.view(packed.shape[0], -1)[:, :in_features]


def dequantize_packed(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int,
                      group_size: int | None = None) -> Tensor:
    """ŵ = s·(u − z) (out, in_features) in ``scale``'s dtype, scale/zero (out, n_groups) each covering
    ``group_size`` consecutive columns (None: in_features/n_groups)."""
    out, n_groups = scale.shape
    g = group_width(in_features, n_groups, group_size)
    u = split_groups(unpack_codes(packed, bits, in_features).to(scale.dtype), g)
    w = u.sub_(zero.to(scale.dtype).unsqueeze(-1)).mul_(scale.unsqueeze(-1)).view(out, -1)
    return w if w.shape[1] == in_features else w[:, :in_features]


def quant_matmul_reference(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bits: int,
                           bias: Tensor | None = None, group_size: int | None = None) -> Tensor:
    """Unpack, dequantize (in ``scale``'s dtype, then x's), ``F.linear``: the CPU path and the parity oracle."""
    w = dequantize_packed(packed, scale, zero, bits, x.shape[-1], group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def pack_for_cpu(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, in_features: int,
                 group_size: int | None = None) -> tuple[Tensor, Tensor] | None:
    """The weight in the layout of torch's CPU int4 kernel: (uint8 codes (out, in/2) in its blocked order, fp32
    [n_groups, out, 2] of (s, s·(8 − z))); None where that kernel does not apply (bits ≠ 4, group size not one of
    32/64/128/256 or not dividing the width, out not a multiple of 16). A one-off conversion: keep the result
    beside the packed weight."""
    out, n_groups = scale.shape
    g = group_width(in_features, n_groups, group_size)
    if bits != 4 or packed.device.type != "cpu" or out % 16 or in_features % g or g not in CPU_INT4_GROUPS:
        return None
    codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_codes(packed, bits, in_features), 1)
    scale = scale.float()
    return codes, torch.stack([scale, scale * (8 - zero.float())], -1).transpose(0, 1).contiguous()


def _cpu_int4(x: Tensor, codes: Tensor, scale_zero: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, codes, group_size, scale_zero.to(x.dtype))
    return y if bias is None else y.add_(bias.to(x.dtype))


# --------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("blocktrain::quant_matmul", mutates_args=())
def _quant_matmul_op(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, bits: int,
                     group_size: int, backend: str, cpu_codes: Tensor | None, cpu_scale_zero: Tensor | None) -> Tensor:
    lead, width = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, width)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "triton":
            y = _triton().quant_matmul(x2.contiguous(), packed, scale, zero, bias, bits, group_size)
        elif backend == "compiled":
            y = _cpu_int4(x2.contiguous(), cpu_codes, cpu_scale_zero, group_size, bias)
        else:
            y = quant_matmul_reference(x2, packed, scale, zero, bits, bias, group_size)
    return y.view(*lead, packed.shape[0])


@_quant_matmul_op.register_fake
def _(x, packed, scale, zero, bias, bits, group_size, backend, cpu_codes, cpu_scale_zero):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scale, zero, bias, bits, group_size, *_ = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.bits, ctx.group_size, ctx.width, ctx.dtype = bits, group_size, x.shape[-1], x.dtype


def _backward(ctx, grad_y):
    packed, scale, zero = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_packed(packed, scale, zero, ctx.bits, ctx.width, ctx.group_size)
        grad_x = grad_y @ w.to(grad_y.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None, None


_quant_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public entry point


def _validate(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bits: int, bias: Tensor | None,
              cpu_packed: tuple[Tensor, Tensor] | None, group_size: int | None) -> int:
    """Checks the arguments; returns the group width."""
    _check_bits(bits)
    width, out = x.shape[-1], packed.shape[0]
    words = -(-width * bits // 32)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != words:
        raise ValueError(f"quant_matmul: packed must be int32 (out, {words}) for {width} inputs at {bits} bits, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if scale.dim() != 2 or scale.shape[0] != out or tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"quant_matmul: scale and zero must both be ({out}, n_groups), got {tuple(scale.shape)} "
                         f"and {tuple(zero.shape)}")
    if group_size is None and width % scale.shape[1]:
        raise ValueError(f"quant_matmul: {scale.shape[1]} groups do not divide the input width {width}")
    try:
        g = group_width(width, scale.shape[1], group_size)
    except ValueError as exc:
        raise ValueError(f"quant_matmul: {exc}") from None
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"quant_matmul: bias must be ({out},), got {tuple(bias.shape)}")
    if cpu_packed is not None and (tuple(cpu_packed[0].shape) != (out, width // 2) or width % g
                                   or tuple(cpu_packed[1].shape) != (scale.shape[1], out, 2)):
        raise ValueError("quant_matmul: cpu_packed is not pack_for_cpu of this weight "
                         f"({tuple(cpu_packed[0].shape)}, {tuple(cpu_packed[1].shape)})")
    return g


def quant_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 bias: Tensor | None = None, cpu_packed: tuple[Tensor, Tensor] | None = None,
                 group_size: int | None = None) -> Tensor:
    """y = x·ŵᵀ + b with ŵ = s·(u − z) from packed codes (see the module docstring).

    x: (..., in); packed: int32 (out, ⌈in·bits/32⌉) from :func:`pack_codes`; scale, zero: (out, n_groups);
    bias: (out,) or None; bits ∈ {2, 4, 8}; cpu_packed: :func:`pack_for_cpu` of the same weight, or None (the
    CPU runs torch's int4 kernel for bf16 x given it, else the reference); group_size: columns per group
    (n_groups = ⌈in/g⌉), None for in/n_groups. Returns (..., out) in x's dtype; differentiable in x and bias.
    """
    g = _validate(x, packed, scale, zero, bits, bias, cpu_packed, group_size)
    usable = cpu_packed is not None and x.dtype == CPU_INT4_DTYPE
    backend = dispatch.select(x.device, x.dtype, compiled=(lambda: True) if usable else None)
    dispatch.announce("quant_matmul", backend)
    codes, scale_zero = cpu_packed if backend == "compiled" else (None, None)
    return torch.ops.blocktrain.quant_matmul(x, packed, scale, zero, bias, int(bits), g, backend, codes, scale_zero)
