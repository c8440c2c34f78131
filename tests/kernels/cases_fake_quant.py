"""Parity cases for ``fake_quant`` (run by :mod:`.parity` in a subprocess); importing this module imports no Triton."""

from __future__ import annotations

import torch

from blocktrain.kernels import dispatch
from blocktrain.kernels.fake_quant import fake_quant

from .parity import ParityCase

# name, rows, cols, n_groups, scale shared by all rows, soft rounding, symmetric, group size (None: cols/n_groups)
SHAPES = [
    ("channel", 7, 13, 1, False, False, False, None),
    ("groups", 9, 48, 3, False, True, False, None),
    ("sym-soft", 5, 40, 5, False, True, True, None),
    ("tokens", 33, 24, 1, False, False, True, None),
    ("static", 10, 17, 1, True, False, False, None),
    ("big", 37, 96, 2, False, True, False, None),  # several programs of 1024 elements
    ("ragged", 9, 44, 3, False, False, False, 16),  # groups of 16, 16 and 12 columns
    ("ragged-soft", 37, 100, 2, False, True, True, 64),  # 64 + 36, several programs
]


def _builder(rows, cols, groups, shared, soft, symmetric, group_size):
    lo, hi = (-8, 7) if symmetric else (0, 15)

    def build(gen: torch.Generator) -> dict:
        srows = 1 if shared else rows
        zero = torch.zeros(srows, groups) if symmetric else torch.randint(3, 13, (srows, groups), generator=gen).float()
        return {"x": torch.randn(rows, cols, generator=gen),
                "scale": torch.rand(srows, groups, generator=gen) * 0.2 + 0.1,
                "zero": zero,
                "v": torch.randn(rows, cols, generator=gen) * 2 if soft else None,
                "lo": lo, "hi": hi, "group_size": group_size}

    return build


def _triton(**kw):
    return fake_quant(**kw)


def _reference(**kw):
    with dispatch.use_backend("reference"):
        return fake_quant(**kw)


CASES = [
    ParityCase(name=f"fake_quant/{name}-{str(dtype).removeprefix('torch.')}",
               build=_builder(rows, cols, groups, shared, soft, symmetric, group_size), triton=_triton,
               reference=_reference, dtype=dtype, grad=("x", "scale") + (("v",) if soft else ()))
    for name, rows, cols, groups, shared, soft, symmetric, group_size in SHAPES
    for dtype in (torch.float32, torch.bfloat16)
]
