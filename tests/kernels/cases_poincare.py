"""Parity cases for ``block_mobius_matvec`` (run by :mod:`.parity` in a subprocess); importing this module imports no Triton."""

from __future__ import annotations

import torch

from blocktrain.kernels import dispatch
from blocktrain.kernels.poincare import block_mobius_matvec, expmap0

from .parity import ParityCase

# name, rows, groups, block size, curvature, tangent scale of x, diagonal of the blocks
SHAPES = [
    ("one-block", 5, 1, 8, 1.0, 0.7, 0.5),
    ("odd", 7, 3, 5, 0.5, 0.7, 0.5),
    ("h4g", 33, 4, 16, 1.0, 0.7, 0.5),
    ("wide", 9, 6, 11, 2.0, 0.7, 0.5),
    # rows at and near the projection radius, blocks that expand them into the tanh clamp, and a zero row
    ("boundary", 8, 2, 8, 1.0, 4.0, 1.5),
]


def _builder(rows, groups, k, c, scale, diag):
    def build(gen: torch.Generator) -> dict:
        x = expmap0(torch.randn(rows, groups * k, generator=gen) * scale, c).float()
        x[rows // 2] = 0.0
        blocks = torch.eye(k) * diag + 0.2 * torch.randn(groups, k, k, generator=gen)
        return {"blocks": blocks, "x": x, "c": c}

    return build


def _triton(**kw):
    return block_mobius_matvec(**kw)


def _reference(**kw):
    with dispatch.use_backend("reference"):
        return block_mobius_matvec(**kw)


CASES = [
    ParityCase(name=f"block_mobius_matvec/{name}-{str(dtype).removeprefix('torch.')}",
               build=_builder(rows, groups, k, c, scale, diag), triton=_triton, reference=_reference, dtype=dtype,
               grad=("blocks", "x"))
    for name, rows, groups, k, c, scale, diag in SHAPES
    for dtype in (torch.float32, torch.bfloat16)
]
