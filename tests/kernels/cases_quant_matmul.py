"""Parity cases for ``quant_matmul`` (run by :mod:`.parity` in a subprocess).

Importing this module must not import Triton: the pytest process imports it to name the cases.
"""

from __future__ import annotations

import torch

from blocktrain.kernels.quant_matmul import pack_codes, quant_matmul, quant_matmul_reference

from .parity import ParityCase

# name, leading shape of x, in, out, bits, group size (None: per channel), has bias; a group size that does not
# divide the width leaves a narrower last group
SHAPES = [
    ("decode-w4-channel", (1,), 64, 33, 4, None, False),
    ("odd-w4-g32", (7,), 96, 10, 4, 32, True),
    ("pad-w2-channel", (5,), 40, 17, 2, None, False),  # 40 codes fill 2.5 words
    ("batched-w2-g64", (2, 9), 128, 70, 2, 64, True),
    ("tiles-w8-g32", (37,), 160, 70, 8, 32, True),
    ("ragged-w4-g32", (7,), 80, 10, 4, 32, True),  # groups of 32, 32, 16
    ("ragged-w2-g128", (2, 9), 576, 40, 2, 128, False),  # SmolLM2's hidden width: 4·128 + 64
]


def _builder(lead, width, out, bits, group, has_bias):
    def build(gen: torch.Generator) -> dict:
        n_groups = 1 if group is None else -(-width // group)
        return {
            "x": torch.randn((*lead, width), generator=gen),
            "packed": pack_codes(torch.randint(0, 2**bits, (out, width), generator=gen), bits),
            "scale": (torch.rand(out, n_groups, generator=gen) + 0.5) / width**0.5,
            "zero": torch.randint(0, 2**bits, (out, n_groups), generator=gen).float(),
            "bits": bits,
            "bias": torch.randn(out, generator=gen) if has_bias else None,
            "group_size": group,
        }

    return build


CASES = [
    ParityCase(
        name=f"quant_matmul/{name}-{str(dtype).removeprefix('torch.')}",
        build=_builder(lead, width, out, bits, group, bias),
        triton=quant_matmul,
        reference=quant_matmul_reference,
        dtype=dtype,
        grad=("x",) + (("bias",) if bias else ()),
    )
    for name, lead, width, out, bits, group, bias in SHAPES
    for dtype in (torch.float32, torch.bfloat16)
]
