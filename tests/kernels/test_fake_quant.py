"""``fake_quant``'s mathematics on the reference path: the grid, LSQ's straight-through gradients against
finite differences, and AdaRound's soft rounding.

What the step-size check compares, exactly: the straight-through estimator treats rounding as the identity
plus a constant, so its gradient is the exact derivative of the *surrogate*

    L̃(s) = Σ g ⊙ s·(clamp(x/s + z, lo, hi) + c − z),   c = round(t₀) − t₀, t₀ = clamp(x/s₀ + z, lo, hi) frozen

(c = 0 where the value clips; for soft rounding c = ⌊x/s₀⌋ + h(v) − x/s₀ and the clamp applies to x/s + c + z,
with v small enough that h stays strictly inside (0, 1), away from the clamp's kinks). At s = s₀ the surrogate
equals the quantizer's output, and its central finite difference in fp64 must equal the op's gradient. The
gradient with respect to v is no estimate: it is compared with finite differences of the op itself.
"""
from __future__ import annotations

import pytest
import torch

from blocktrain.kernels.fake_quant import GAMMA, ZETA, fake_quant, rectified_sigmoid
from blocktrain.trainer.compression.quant import QuantSpec, expand_groups, fake_quantize, minmax_qparams, qrange

D = torch.float64


def _problem(rows=6, cols=16, groups=2, seed=0, symmetric=False):
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(4, symmetric, None if groups == 1 else cols // groups)
    x = torch.randn(rows, cols, generator=gen, dtype=D)
    scale, zero = minmax_qparams(x * 0.8, spec)  # a narrower grid than x's range: some values clip
    return x, scale.to(D), zero.to(D), spec


@pytest.mark.parametrize("groups,symmetric", [(1, False), (4, False), (2, True)])
def test_round_to_nearest_forward_is_the_shared_grid(groups, symmetric):
    x, scale, zero, spec = _problem(groups=groups, symmetric=symmetric)
    got = fake_quant(x.float(), scale.float(), zero.float(), *qrange(spec))
    assert torch.equal(got, fake_quantize(x.float(), scale.float(), zero.float(), spec))


def _surrogate_fd(x, scale, zero, lo, hi, g, v=None, eps=1e-7, group_size=None):
    """Central finite differences of L̃(s) (see the module docstring), one step-size entry at a time."""
    cols = x.shape[1]
    s0, z = expand_groups(scale, cols, group_size), expand_groups(zero, cols, group_size)
    t0 = (x / s0 + z).clamp(lo, hi)
    c = torch.round(t0) - t0 if v is None else torch.floor(x / s0) + rectified_sigmoid(v) - x / s0

    def surrogate(s):
        return s * ((x / s + z).clamp(lo, hi) + c - z) if v is None else s * ((x / s + c + z).clamp(lo, hi) - z)

    fd = torch.zeros_like(scale)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in scale.shape)).tolist():
        vals = []
        for sign in (1, -1):
            s = scale.clone()
            s[tuple(idx)] += sign * eps
            s = expand_groups(s, cols, group_size)
            vals.append((g * surrogate(s)).sum())
        fd[tuple(idx)] = (vals[0] - vals[1]) / (2 * eps)
    return fd


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("soft", [False, True])
def test_step_size_gradient_matches_finite_differences_of_the_ste_surrogate(groups, soft):
    x, scale, zero, spec = _problem(groups=groups, seed=groups)
    lo, hi = qrange(spec)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=D)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=D) * 0.5 if soft else None
    s = scale.clone().requires_grad_()
    (fake_quant(x, s, zero, lo, hi, v=v) * g).sum().backward()
    fd = _surrogate_fd(x, scale, zero, lo, hi, g, v)
    torch.testing.assert_close(s.grad, fd, rtol=1e-6, atol=1e-6)
    clipped = ((x / scale.repeat_interleave(x.shape[1] // groups, 1) + zero.repeat_interleave(x.shape[1] // groups, 1))
               .gt(hi)).any()
    assert clipped, "the problem must exercise the clamp branch"


@pytest.mark.parametrize("soft", [False, True])
def test_ragged_groups_forward_and_step_size_gradient(soft):
    """Groups of 8 over 20 columns (8, 8, 4): the grid's forward, and each step size's gradient (the last one from
    its own 4 columns only) against finite differences of the surrogate."""
    gen = torch.Generator().manual_seed(11)
    spec = QuantSpec(4, False, 8, ragged=True)
    x = torch.randn(6, 20, generator=gen, dtype=D)
    scale, zero = minmax_qparams(x * 0.8, spec)
    scale = scale.to(D)
    lo, hi = qrange(spec)
    assert scale.shape == (6, 3)
    assert torch.equal(fake_quant(x.float(), scale.float(), zero, lo, hi, group_size=8),
                       fake_quantize(x.float(), scale.float(), zero, spec))
    g = torch.randn(x.shape, generator=gen, dtype=D)
    v = torch.randn(x.shape, generator=gen, dtype=D) * 0.5 if soft else None
    s = scale.clone().requires_grad_()
    (fake_quant(x, s, zero, lo, hi, v=v, group_size=8) * g).sum().backward()
    torch.testing.assert_close(s.grad, _surrogate_fd(x, scale, zero, lo, hi, g, v, group_size=8), rtol=1e-6, atol=1e-6)
    g[:, 16:] = 0  # the last group's gradient comes from its own columns
    s.grad = None
    (fake_quant(x, s, zero, lo, hi, v=v, group_size=8) * g).sum().backward()
    assert torch.all(s.grad[:, 2] == 0) and torch.all(s.grad[:, :2] != 0)
    with pytest.raises(ValueError, match="n_groups dividing 20"):
        fake_quant(x, scale, zero, lo, hi)  # without the group size, 3 groups cannot cover 20 columns


def test_lsq_gradient_scale_and_the_input_gradient():
    x, scale, zero, spec = _problem()
    lo, hi = qrange(spec)
    grads = []
    for factor in (1.0, 0.25):
        s, xx = scale.clone().requires_grad_(), x.clone().requires_grad_()
        fake_quant(xx, s, zero, lo, hi, grad_scale=factor).sum().backward()
        grads.append((s.grad, xx.grad))
    torch.testing.assert_close(grads[1][0], 0.25 * grads[0][0])
    t = x / scale.repeat_interleave(8, 1) + zero.repeat_interleave(8, 1)
    assert torch.equal(grads[0][1], ((t >= lo) & (t <= hi)).to(D))  # straight through inside the range, else 0
    assert 0 < int((grads[0][1] == 0).sum()) < x.numel()


def test_a_shared_static_scale_gets_the_sum_of_the_per_row_gradients():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(4), dtype=D)
    shared = torch.tensor([[0.2]], dtype=D, requires_grad=True)
    zero = torch.tensor([[7.0]], dtype=D)
    fake_quant(x, shared, zero, 0, 15).pow(2).sum().backward()
    per_row = shared.detach().expand(9, 1).clone().requires_grad_()
    fake_quant(x, per_row, zero.expand(9, 1), 0, 15).pow(2).sum().backward()
    torch.testing.assert_close(shared.grad, per_row.grad.sum(0, keepdim=True))


def test_soft_rounding_forward_and_its_exact_v_gradient():
    x, scale, zero, spec = _problem(groups=2, seed=5)
    lo, hi = qrange(spec)
    s, z = scale.repeat_interleave(8, 1), zero.repeat_interleave(8, 1)
    big = torch.full_like(x, 50.0)
    down, up = fake_quant(x, scale, zero, lo, hi, v=-big), fake_quant(x, scale, zero, lo, hi, v=big)
    assert torch.equal(down, s * ((torch.floor(x / s) + z).clamp(lo, hi) - z))  # h = 0: round down
    assert torch.equal(up, s * ((torch.floor(x / s) + 1 + z).clamp(lo, hi) - z))  # h = 1: round up
    torch.testing.assert_close(rectified_sigmoid(torch.tensor([0.0])), torch.tensor([0.5]))
    assert ZETA == 1.1 and GAMMA == -0.1

    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=D)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=D)
    vv = v.clone().requires_grad_()
    (fake_quant(x, scale, zero, lo, hi, v=vv) * g).sum().backward()
    eps = 1e-6
    for i, j in [(0, 0), (2, 5), (5, 15), (3, 9)]:
        plus, minus = v.clone(), v.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        fd = ((fake_quant(x, scale, zero, lo, hi, v=plus) - fake_quant(x, scale, zero, lo, hi, v=minus)) * g).sum() / (2 * eps)
        assert float(vv.grad[i, j]) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_bad_shapes_are_refused():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="n_groups dividing"):
        fake_quant(x, torch.ones(4, 4), torch.zeros(4, 4), 0, 15)
    with pytest.raises(ValueError, match="v must have"):
        fake_quant(x, torch.ones(4, 1), torch.zeros(4, 1), 0, 15, v=torch.zeros(4, 5))
