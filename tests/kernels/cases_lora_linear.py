"""Parity cases and Triton-only checks for ``lora_linear`` (run by :mod:`.parity` in a subprocess).

Importing this module must not import Triton: the pytest process imports it to name the cases.
"""

from __future__ import annotations

import torch

from blocktrain.kernels import dispatch
from blocktrain.kernels.lora_linear import dropout_keep_mask, lora_linear, lora_linear_seeded, lora_linear_unfused

from .parity import Check, ParityCase

# name, leading shape of x, in, n_blocks, out, r, has bias, weight trainable, x transposed in memory
SHAPES = [
    ("odd", (7,), 24, 3, 10, 2, True, False, False),
    ("tiles", (37,), 200, 1, 70, 3, False, False, False),
    ("batched", (2, 9), 48, 4, 20, 4, True, True, True),
]


def _builder(lead, width, n_blocks, out, rank, has_bias, transposed, p):
    def build(gen: torch.Generator) -> dict:
        shape = (*lead[::-1], width) if transposed else (*lead, width)
        x = torch.randn(shape, generator=gen)
        return {
            "x": x.transpose(0, 1) if transposed else x,
            "weight": torch.randn(out, width, generator=gen) / width**0.5,  # LoRA term dominates y and grad_x
            "bias": torch.randn(out, generator=gen) if has_bias else None,
            "lora_a": torch.randn(rank, width // n_blocks, generator=gen),
            "lora_b": torch.randn(out, rank, generator=gen),
            "scaling": 0.5,
            "n_blocks": n_blocks,
            "dropout_p": p,
            "seed": int(torch.randint(2**62, (), generator=gen)),
        }

    return build


def _triton(x, weight, bias, lora_a, lora_b, scaling, n_blocks, dropout_p, seed):
    return lora_linear_seeded(x, weight, bias, lora_a, lora_b, scaling, n_blocks, dropout_p, seed)


def _reference(x, weight, bias, lora_a, lora_b, scaling, n_blocks, dropout_p, seed):
    """The unfused composition under the mask that the Triton kernels draw for ``seed``."""
    mask = None
    if dropout_p > 0:
        rows = x.numel() // x.shape[-1]
        mask = dropout_keep_mask(seed, rows, x.shape[-1], dropout_p, x.device, "triton").view(x.shape)
    return lora_linear_unfused(x, weight, bias, lora_a, lora_b, scaling, n_blocks, dropout_p, mask=mask)


CASES = [
    ParityCase(
        name=f"lora_linear/{name}-{str(dtype).removeprefix('torch.')}-p{p}",
        build=_builder(lead, width, n, out, r, bias, transposed, p),
        triton=_triton,
        reference=_reference,
        dtype=dtype,
        grad=("x", "lora_a", "lora_b") + (("bias",) if bias else ()) + (("weight",) if w_grad else ()),
    )
    for name, lead, width, n, out, r, bias, w_grad, transposed in SHAPES
    for dtype in (torch.float32, torch.bfloat16)
    for p in (0.0, 0.25)
]


def _seed(value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


def check_mask(device: torch.device) -> None:
    """The mask kernel writes every element, keeps 1-p, varies over rows, columns and seeds."""
    from blocktrain.kernels import _lora_linear_triton as tri

    rows, cols = 300, 200
    for p in (0.25, 0.5):
        with dispatch.poisoned_outputs():
            raw = tri.keep_mask(_seed(11, device), rows, cols, p)
        assert raw.max() <= 1, "mask kernel left elements unwritten"
        keep = raw.bool()
        rate = keep.float().mean().item()
        assert abs(rate - (1 - p)) < 0.01, f"keep rate {rate:.4f} for p={p}"
        assert not (keep.all(1) | (~keep).all(1)).any(), "a whole row shares one draw"
        assert not (keep.all(0) | (~keep).all(0)).any(), "a whole column shares one draw"
        assert torch.equal(keep, tri.keep_mask(_seed(11, device), rows, cols, p).bool()), "same seed, other mask"
        same = (keep == tri.keep_mask(_seed(12, device), rows, cols, p).bool()).float().mean().item()
        assert abs(same - (p * p + (1 - p) ** 2)) < 0.02, f"seeds 11 and 12 agree on {same:.3f} of the mask"
        head = tri.keep_mask(_seed(11, device), 10, cols, p).bool()
        assert torch.equal(head, keep[:10]), "the mask of a row depends on the number of rows"


def check_expectation(device: torch.device) -> None:
    """Dropout keeps E[y]: the mean of y over many rows holding the same x is y without dropout."""
    gen = torch.Generator().manual_seed(3)
    rows, width, n_blocks, out, rank = 512, 32, 4, 6, 2
    row = torch.randn(1, width, generator=gen).to(device)
    weight = torch.zeros(out, width, device=device)
    a = torch.randn(rank, width // n_blocks, generator=gen).to(device)
    b = torch.randn(out, rank, generator=gen).to(device)
    with dispatch.use_backend("triton"):
        y = lora_linear(row.expand(rows, width), weight, None, a, b, 1.0, n_blocks, 0.25)
        y0 = lora_linear(row, weight, None, a, b, 1.0, n_blocks, 0.25, training=False)
    std = y.std(0)
    assert (std > 0).all(), "dropout left some outputs constant over 512 draws"
    z = ((y.mean(0) - y0[0]).abs() / (std / rows**0.5)).max().item()
    assert z < 5, f"mean of y off E[y] by {z:.1f} standard errors"


def check_backward_pinned(device: torch.device) -> None:
    """The backward runs on the forward's backend (its mask), whatever the backend is by then."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 24, generator=gen).to(device)
    weight = torch.randn(10, 24, generator=gen).to(device)
    a = torch.randn(2, 8, generator=gen).to(device)
    b = torch.randn(10, 2, generator=gen).to(device)
    grads = []
    for backward_backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        with dispatch.use_backend("triton"):
            y = lora_linear_seeded(leaves[0], weight, None, leaves[1], leaves[2], 0.5, 3, 0.5, seed=77)
        with dispatch.use_backend(backward_backend):
            y.backward(torch.ones_like(y))
        grads.append([t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


CHECKS = [
    Check("lora_linear/mask", check_mask),
    Check("lora_linear/expectation", check_expectation),
    Check("lora_linear/backward-pinned", check_backward_pinned),
]
