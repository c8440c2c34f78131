"""Parity cases for ``block_sparse_linear`` (run by :mod:`.parity` in a subprocess): the Triton kernels against the
dense linear with the same (zero-filled) weight, forward and the gradients of x, the stored blocks and the bias.

Importing this module must not import Triton: the pytest process imports it to name the cases.
"""

from __future__ import annotations

import torch

from blocktrain.kernels.block_sparse_linear import block_sparse_linear, from_bsr, to_bsr

from .parity import ParityCase

# name, leading shape of x, in, out, block, has bias
SHAPES = [
    ("b16-odd-rows", (37,), 64, 48, (16, 16), True),
    ("b32-batched", (2, 9), 96, 64, (32, 32), False),
    ("b16x32-nonsquare", (5,), 64, 32, (16, 32), True),
    ("b32x64-nonsquare", (33,), 128, 64, (32, 64), False),
]


def _builder(lead, width, out, block, has_bias):
    def build(gen: torch.Generator) -> dict:
        keep = torch.rand(out // block[0], width // block[1], generator=gen) < 0.5
        keep[0, 0] = True  # at least one block; some block rows may be empty
        weight = torch.randn(out, width, generator=gen) * keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        values, crow, col = to_bsr(weight, block)
        return {"x": torch.randn((*lead, width), generator=gen), "values": values, "crow": crow, "col": col,
                "bias": torch.randn(out, generator=gen) if has_bias else None, "out_features": out}

    return build


def dense_reference(x, values, crow, col, bias, out_features):
    weight = from_bsr(values, crow, col, (out_features, x.shape[-1]))
    y = x @ weight.t()
    return y if bias is None else y + bias


CASES = [
    ParityCase(
        name=f"block_sparse_linear/{name}-{str(dtype).removeprefix('torch.')}",
        build=_builder(lead, width, out, block, bias),
        triton=block_sparse_linear,
        reference=dense_reference,
        dtype=dtype,
        grad=("x", "values") + (("bias",) if bias else ()),
    )
    for name, lead, width, out, block, bias in SHAPES
    for dtype in (torch.float32, torch.bfloat16)
]
