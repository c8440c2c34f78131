"""The quantization cores: the grid round-trips, RTN is fake_quantize of the weights, GPTQ equals a plain
column-by-column OBS reference (no blocks, no Cholesky) and beats RTN on correlated inputs."""
from __future__ import annotations

import pytest
import torch

from blocktrain.plugins.quantization import gptq_layer, rtn_layer, rtn_quantize, search_clip
from blocktrain.trainer.compression.quant import (QuantLinear, QuantSpec, dequantize, fake_quantize, minmax_qparams,
                                                  qrange, quantize)


def weight(rows=12, cols=32, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def correlated_inputs(n=256, cols=32, seed=1) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a random mixing of few sources, plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    sources = torch.randn(n, 6, generator=gen)
    return sources @ torch.randn(6, cols, generator=gen) + 0.1 * torch.randn(n, cols, generator=gen)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_grid_values_round_trip_exactly(bits, symmetric, group_size):
    spec = QuantSpec(bits, symmetric, group_size)
    w = weight()
    w[0, :5] = 0.0
    scale, zero = minmax_qparams(w, spec)
    codes = quantize(w, scale, zero, spec)
    lo, hi = qrange(spec)
    assert codes.min() >= lo and codes.max() <= hi
    grid = dequantize(codes, scale, zero)
    assert torch.equal(quantize(grid, scale, zero, spec), codes)  # a grid value is its own code
    assert torch.equal(fake_quantize(grid, scale, zero, spec), grid)
    assert torch.all(grid[0, :5] == 0)  # zero is on the grid
    step = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    assert torch.all((grid - w).abs() <= step / 2 + 1e-6)  # round to nearest inside the range


@pytest.mark.parametrize("group_size", [None, 8])
def test_rtn_is_fake_quantize_of_the_weights(group_size):
    spec = QuantSpec(3, False, group_size)
    w = weight()
    codes, scale, zero = rtn_layer(w, spec)
    assert torch.equal(dequantize(codes, scale, zero), fake_quantize(w, *minmax_qparams(w, spec), spec))

    model = torch.nn.Sequential(torch.nn.Linear(32, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    original = model[0].weight.detach().clone()
    rtn_quantize(model, spec, names=["0"])
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], torch.nn.Linear)
    assert torch.equal(model[0].weight, fake_quantize(original, *minmax_qparams(original, spec), spec))
    x = torch.randn(5, 32)
    assert torch.allclose(model[0](x), torch.nn.functional.linear(x, model[0].weight, model[0].bias))


def test_clip_search_never_increases_the_weight_error():
    spec = QuantSpec(3, False, 8)
    w = weight()
    w[:, 3] *= 8  # outliers make shrinking the range worth it
    plain = rtn_layer(w, spec)
    clipped = rtn_layer(w, spec, clip_search=True)
    err = lambda q: (dequantize(*q) - w).pow(2).reshape(w.shape[0], -1, 8).sum(2)
    assert torch.all(err(clipped) <= err(plain) + 1e-6)
    assert (search_clip(w, spec) < 1).any() and err(clipped).sum() < err(plain).sum()


def gptq_reference(w, H, spec, damp=0.01, act_order=False, static_groups=False, keep=None):
    """GPTQ written the slow, obvious way: one column at a time (in order, or by descending Hessian diagonal),
    the optimal OBS update of every other column through the full inverse Hessian, which then has that column
    eliminated; a group's range is taken from its current weights when the sweep first reaches it."""
    W = w.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    W[:, dead] = 0
    if keep is not None:
        W[~keep] = 0
    Hd = H.double().clone()
    Hd[dead, dead] = 1
    Hd += damp * Hd.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(Hd)
    g = spec.group_size or cols
    n_groups = -(-cols // g)  # a ragged last group (spec.ragged) covers the remaining columns
    scale, zero = torch.zeros(rows, n_groups), torch.zeros(rows, n_groups)
    ready = [False] * n_groups
    if static_groups or spec.group_size is None:
        scale, zero = minmax_qparams(W.float(), spec)
        ready = [True] * n_groups
    order = torch.argsort(H.diagonal(), descending=True, stable=True).tolist() if act_order else range(cols)
    column = QuantSpec(spec.bits, spec.symmetric)
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    for c in order:
        k = c // g
        if not ready[k]:
            current = W[:, k * g:(k + 1) * g].float()
            if keep is not None:
                current = current * keep[:, k * g:(k + 1) * g]
            scale[:, k:k + 1], zero[:, k:k + 1] = minmax_qparams(current, column)
            ready[k] = True
        q = quantize(W[:, c:c + 1].float(), scale[:, k:k + 1], zero[:, k:k + 1], column)[:, 0]
        if keep is not None:
            q = torch.where(keep[:, c], q, zero[:, k].to(torch.int32))
        codes[:, c] = q
        err = (W[:, c] - dequantize(q[:, None], scale[:, k:k + 1], zero[:, k:k + 1]).double()[:, 0]) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :]
        Hinv -= Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return codes, scale, zero


@pytest.mark.parametrize("group_size,act_order,static_groups", [
    (None, False, False), (8, False, False), (None, True, False), (8, True, False), (8, True, True), (16, False, True),
])
@pytest.mark.parametrize("blocksize", [5, 40])
def test_gptq_equals_the_column_by_column_reference(group_size, act_order, static_groups, blocksize):
    spec = QuantSpec(3, False, group_size)
    w = weight(cols=(24 if group_size == 8 else 32) * (4 if blocksize > 5 else 1))
    x = correlated_inputs(cols=w.shape[1])
    H = hessian(x)
    # blocksize 5: blocks that do not line up with groups of 8 or 16 (a group's range spans two blocks); 40: blocks
    # split into sub-blocks of 16, 16, 8 whose errors reach the rest of the block and later blocks at different times
    codes, scale, zero = gptq_layer(w, H, spec, blocksize=blocksize, act_order=act_order, static_groups=static_groups)
    ref_codes, ref_scale, ref_zero = gptq_reference(w, H, spec, act_order=act_order, static_groups=static_groups)
    assert torch.allclose(scale, ref_scale, rtol=1e-4, atol=1e-6) and torch.equal(zero, ref_zero)
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("blocksize", [5, 40])
def test_gptq_with_a_ragged_last_group_equals_the_column_by_column_reference(act_order, static_groups, blocksize):
    spec = QuantSpec(3, False, 8, ragged=True)
    w = weight(cols=44 if blocksize > 5 else 20)  # groups of 8 and a last one of 4
    H = hessian(correlated_inputs(cols=w.shape[1]))
    codes, scale, zero = gptq_layer(w, H, spec, blocksize=blocksize, act_order=act_order, static_groups=static_groups)
    ref_codes, ref_scale, ref_zero = gptq_reference(w, H, spec, act_order=act_order, static_groups=static_groups)
    assert scale.shape == (w.shape[0], -(-w.shape[1] // 8))
    assert torch.allclose(scale, ref_scale, rtol=1e-4, atol=1e-6) and torch.equal(zero, ref_zero)
    assert torch.equal(codes, ref_codes)


def test_gptq_keeps_pruned_weights_exactly_zero_like_the_reference():
    spec = QuantSpec(4, False, 8)
    w = weight(cols=24)
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    w = w * keep
    H = hessian(correlated_inputs(cols=24))
    codes, scale, zero = gptq_layer(w, H, spec, blocksize=5, keep=keep)
    assert torch.all(dequantize(codes, scale, zero)[~keep] == 0)
    assert torch.equal(codes, gptq_reference(w, H, spec, keep=keep)[0])


@pytest.mark.parametrize("bits,group_size", [(3, None), (4, 8), (2, 16)])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(bits, group_size):
    spec = QuantSpec(bits, False, group_size)
    w, x = weight(rows=32, cols=32), correlated_inputs()
    out = x @ w.T
    error = lambda q: (x @ dequantize(*q).T - out).pow(2).sum().item()
    gptq, rtn = error(gptq_layer(w, hessian(x), spec)), error(rtn_layer(w, spec))
    assert gptq < 0.7 * rtn, (gptq, rtn)
