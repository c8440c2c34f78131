"""lora_linear's reference path (the CPU path): math, gradients, registration, dropout, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocktrain.kernels import lora_linear
from blocktrain.kernels.lora_linear import dropout_keep_mask, lora_linear_seeded, lora_linear_unfused


def make(lead=(3, 5), width=24, n_blocks=3, out=10, rank=2, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(x=rand(*lead, width), weight=rand(out, width) / width**0.5, bias=rand(out) if bias else None,
                lora_a=rand(rank, width // n_blocks), lora_b=rand(out, rank), scaling=0.5, n_blocks=n_blocks)


def leaves(inputs: dict, names) -> dict:
    return {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()}


@pytest.mark.parametrize("n_blocks", [1, 3, 8])
def test_equals_the_merged_weight_without_dropout(n_blocks):
    inp = make(width=48, n_blocks=n_blocks)
    tiled = torch.cat([inp["lora_a"]] * n_blocks, dim=1)  # W0 + s·B·tile(A, n)
    merged = inp["weight"] + inp["scaling"] * inp["lora_b"] @ tiled
    want = F.linear(inp["x"], merged, inp["bias"])
    torch.testing.assert_close(lora_linear(**inp), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_linear(**inp, dropout_p=0.5, training=False), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_blocks,p,trainable", [
    (1, 0.0, ("x", "lora_a", "lora_b", "bias")),
    (2, 0.0, ("x", "weight", "lora_a", "lora_b")),
    (1, 0.3, ("x", "weight", "bias", "lora_a", "lora_b")),
    (4, 0.3, ("x", "lora_a", "lora_b", "bias")),
    (4, 0.3, ("lora_a", "lora_b")),
])
def test_forward_and_gradients_match_the_unfused_composition_under_the_same_mask(n_blocks, p, trainable):
    inp = make(lead=(6, 4), width=32, n_blocks=n_blocks, seed=n_blocks)
    inp["x"] = inp["x"].transpose(0, 1)  # a strided input
    ours, theirs = leaves(inp, trainable), leaves(inp, trainable)
    mask = dropout_keep_mask(1234, 24, 32, p).view(4, 6, 32) if p else None  # over x's logical rows
    y = lora_linear_seeded(**ours, dropout_p=p, seed=1234)
    want = lora_linear_unfused(**theirs, dropout_p=p, mask=mask)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [ours[k] for k in trainable], grad)
    expected = torch.autograd.grad(want, [theirs[k] for k in trainable], grad)
    for name, g, e in zip(trainable, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("n_blocks,p", [(1, 0.0), (3, 0.0), (3, 0.4)])
def test_gradcheck_float64(n_blocks, p):
    inp = make(lead=(2, 3), width=12, n_blocks=n_blocks, out=5, dtype=torch.float64)
    names = ("x", "weight", "bias", "lora_a", "lora_b")
    args = [inp[k].requires_grad_() for k in names]
    fn = lambda *t: lora_linear_seeded(*t, inp["scaling"], n_blocks, p, seed=99)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("n_blocks,seed,bias", [(1, None, False), (3, None, True), (3, 21, True), (1, 21, False)])
def test_opcheck(n_blocks, seed, bias):
    inp = make(lead=(2, 3), width=12, n_blocks=n_blocks, out=5, bias=bias)
    for k in ("x", "lora_a", "lora_b"):
        inp[k].requires_grad_()
    seed = None if seed is None else torch.tensor(seed)
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], 0.5, n_blocks, 0.25 if seed is not None
            else 0.0, seed, "reference")
    torch.library.opcheck(torch.ops.blocktrain.lora_linear.default, args)


def test_torch_compile_sees_one_op_and_matches_eager():
    inp = leaves(make(), ("x", "lora_a", "lora_b", "bias"))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = lambda x, weight, bias, lora_a, lora_b, p: lora_linear(x, weight, bias, lora_a, lora_b, 0.5, 3, p)  # noqa
    args = [inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b")]
    torch.compile(fn, backend=record, fullgraph=True)(*args, 0.25)
    calls = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.blocktrain.lora_linear.default) + calls.count(torch.ops.blocktrain.lora_linear) == 1
    assert not {torch.matmul, F.linear, torch.nn.functional.dropout} & set(calls)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y = compiled(*args, 0.0)
    want = fn(*args, 0.0)
    torch.testing.assert_close(y, want)
    got = torch.autograd.grad(y.square().sum(), args[2:])
    expected = torch.autograd.grad(want.square().sum(), args[2:])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    y = compiled(*args, 0.25)
    assert all(g.isfinite().all() for g in torch.autograd.grad(y.sum(), args[2:]))


def test_dropout_comes_from_torch_generator_and_eval_disables_it():
    inp = make()
    torch.manual_seed(7)
    first = lora_linear(**inp, dropout_p=0.5)
    second = lora_linear(**inp, dropout_p=0.5)
    torch.manual_seed(7)
    assert torch.equal(lora_linear(**inp, dropout_p=0.5), first)
    assert not torch.equal(first, second)
    assert torch.equal(lora_linear(**inp, dropout_p=0.5, training=False), lora_linear(**inp))


def test_reference_mask_keeps_one_minus_p_and_varies_everywhere():
    for p in (0.1, 0.25, 0.5):
        keep = dropout_keep_mask(5, 300, 200, p)
        assert keep.dtype == torch.bool and keep.shape == (300, 200)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.01
        assert not (keep.all(1) | (~keep).all(1)).any()
        assert not (keep.all(0) | (~keep).all(0)).any()
        assert torch.equal(keep, dropout_keep_mask(5, 300, 200, p))
        same = (keep == dropout_keep_mask(6, 300, 200, p)).float().mean().item()
        assert abs(same - (p * p + (1 - p) ** 2)) < 0.02


def test_dropout_keeps_the_expectation():
    gen = torch.Generator().manual_seed(3)
    rows, width, n_blocks = 2048, 32, 4
    row = torch.randn(1, width, generator=gen)
    weight = torch.zeros(6, width)
    a, b = torch.randn(2, width // n_blocks, generator=gen), torch.randn(6, 2, generator=gen)
    y = lora_linear(row.expand(rows, width), weight, None, a, b, 1.0, n_blocks, 0.25)
    y0 = lora_linear(row, weight, None, a, b, 1.0, n_blocks)
    std = y.std(0)
    assert (std > 0).all()
    z = ((y.mean(0) - y0[0]).abs() / (std / rows**0.5)).max().item()
    assert z < 5, f"mean off E[y] by {z:.1f} standard errors"


def saved_bytes(fn, exclude) -> int:
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("n_blocks", [1, 8])
def test_saves_only_the_chunk_sum_and_a_seed(n_blocks):
    rows, width, rank = 64, 96, 2
    inp = leaves(make(lead=(rows,), width=width, n_blocks=n_blocks, rank=rank), ("x", "lora_a", "lora_b"))
    params = [inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"]]
    ours = saved_bytes(lambda: lora_linear(**inp, dropout_p=0.25), params)
    xs, u, seed = rows * width // n_blocks * 4, rows * rank * 4, 8
    assert ours == xs + u + seed
    assert ours < saved_bytes(lambda: lora_linear_unfused(**inp, dropout_p=0.25), params)
    inp["weight"].requires_grad_()
    assert saved_bytes(lambda: lora_linear(**inp, dropout_p=0.25), params) == ours + rows * width * 4


def test_frozen_inputs_get_no_gradient():
    inp = leaves(make(), ("lora_a", "lora_b"))
    y = lora_linear_seeded(**inp, dropout_p=0.3, seed=3)
    y.sum().backward()
    assert inp["x"].grad is None and inp["weight"].grad is None and inp["bias"].grad is None
    mask = dropout_keep_mask(3, 15, 24, 0.3).view(3, 5, 24)
    ref = leaves(inp, ("lora_a", "lora_b"))
    lora_linear_unfused(**ref, dropout_p=0.3, mask=mask).sum().backward()
    torch.testing.assert_close(inp["lora_a"].grad, ref["lora_a"].grad)
    torch.testing.assert_close(inp["lora_b"].grad, ref["lora_b"].grad)


def test_bfloat16_and_autocast():
    inp = make()
    want = lora_linear(**inp)
    low = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    y = lora_linear(**low)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    params = leaves(inp, ("lora_a", "lora_b"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(**params)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert params["lora_a"].grad.dtype == torch.float32
    ref = leaves(inp, ("lora_a", "lora_b"))
    lora_linear(**ref).sum().backward()
    torch.testing.assert_close(params["lora_b"].grad, ref["lora_b"].grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(4, 25)), "input width 25 is not divisible by n_blocks=3"),
    (dict(n_blocks=0), "n_blocks must be >= 1"),
    (dict(lora_a=torch.randn(2, 24)), r"lora_a must be \(r, in/n_blocks\) = \(r, 8\)"),
    (dict(lora_b=torch.randn(10, 3)), r"lora_b must be \(out, r\) = \(10, 2\)"),
    (dict(bias=torch.randn(11)), r"bias must be \(10,\)"),
    (dict(weight=torch.randn(10, 12)), r"weight must be \(out, 24\)"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
])
def test_bad_arguments_are_value_errors(change, message):
    inp = {**make(), "dropout_p": 0.0, **change}
    with pytest.raises(ValueError, match=message):
        lora_linear(**inp)


def test_weight_dtype_must_match_x():
    inp = make()
    inp["weight"] = inp["weight"].double()
    with pytest.raises(TypeError, match="float64"):
        lora_linear(**inp)
