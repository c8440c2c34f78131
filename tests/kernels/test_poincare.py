"""The Poincaré ops' mathematics (methods/h4g.md §3, §7): the radius identity of the Möbius matvec, identity
and block-diagonal equivalences, staying inside the ball, and agreement with geoopt's PoincareBall in float64."""

from __future__ import annotations

import geoopt
import pytest
import torch

from blocktrain.kernels.poincare import (BALL_EPS, FP32_SAFE_NORM, block_diag_dense, block_mobius_matvec, dist, expmap0, logmap0,
                                         mobius_add, mobius_matvec, pairwise_dist, project, radius)

F64 = torch.float64


def _points(n, d, c, scale=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return expmap0(torch.randn(n, d, generator=g, dtype=F64) * scale, c)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_radius_scales_by_the_euclidean_gain(c):
    """r(M ⊗ x) = (‖Mx‖/‖x‖)·r(x), exactly (to 1e-5) in float64, for dense and contractive matrices."""
    x = _points(64, 12, c, scale=0.5)
    m = torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.3
    gain = (x @ m.T).norm(dim=-1) / x.norm(dim=-1)
    got = radius(mobius_matvec(m, x, c, eps=1e-12), c)
    assert torch.allclose(got, gain * radius(x, c), rtol=1e-5, atol=1e-8)
    assert (gain < 1).any()  # the test sees contraction
    assert not torch.allclose(got, radius(x, c))


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_scalar_matrix_scales_the_radius_and_identity_is_identity(c):
    x = _points(32, 8, c)
    eye = torch.eye(8, dtype=F64)
    assert torch.allclose(mobius_matvec(eye, x, c), x, atol=1e-12)
    assert torch.allclose(block_mobius_matvec(torch.eye(4, dtype=F64).expand(2, 4, 4), x, c), x, atol=1e-12)
    assert torch.allclose(radius(mobius_matvec(0.5 * eye, x, c), c), 0.5 * radius(x, c), atol=1e-10)


def test_block_diagonal_equals_the_dense_block_diagonal_matrix():
    g = torch.Generator().manual_seed(2)
    blocks = torch.randn(3, 5, 5, generator=g, dtype=F64)
    x = _points(20, 15, 1.0).view(4, 5, 15)
    dense = block_diag_dense(blocks)
    assert dense.shape == (15, 15) and dense[:5, 5:].abs().sum() == 0
    assert torch.allclose(block_mobius_matvec(blocks, x, 1.0), mobius_matvec(dense, x, 1.0), atol=1e-12)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_outputs_stay_inside_the_ball_with_finite_gradients(c, dtype):
    """Points on and beyond the boundary, huge tangent vectors and huge matrices: finite, inside, differentiable."""
    max_norm = (1 - BALL_EPS) / c ** 0.5
    d = 8
    unit = torch.nn.functional.normalize(torch.randn(6, d, dtype=dtype), dim=-1)
    boundary = unit / c ** 0.5  # exactly on the boundary
    huge = unit * 1e30
    u = torch.cat([boundary, huge, unit * 3.0, torch.zeros(2, d, dtype=dtype)]).requires_grad_()  # and the origin
    blocks = (torch.randn(2, 4, 4, dtype=dtype) * 1e6).requires_grad_()
    outs = {"expmap0": expmap0(u, c), "project": project(u, c), "mobius_matvec": mobius_matvec(blocks[0].repeat(2, 2), u, c),
            "block": block_mobius_matvec(blocks, u, c), "block_of_ball": block_mobius_matvec(blocks, expmap0(u, c), c)}
    for name, y in outs.items():
        assert torch.isfinite(y).all(), name
        assert (y.norm(dim=-1) <= max_norm * (1 + 1e-6)).all(), name
        gu, gb = torch.autograd.grad(y.sum() + radius(y, c).sum(), (u, blocks), allow_unused=True)
        assert torch.isfinite(gu).all(), name
        assert gb is None or torch.isfinite(gb).all(), name
    for name, y in {"logmap0": logmap0(boundary, c), "radius": radius(huge, c), "dist": dist(boundary, -boundary, c)}.items():
        assert torch.isfinite(y).all(), name


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_each_op_equals_geoopt_in_float64(c):
    ball = geoopt.PoincareBall(c=torch.tensor(c, dtype=F64))  # a float32 c would cost geoopt 1e-6
    x, y = _points(40, 10, c, scale=0.3, seed=3), _points(40, 10, c, scale=0.3, seed=4)  # well conditioned: d < 4
    u = torch.randn(40, 10, generator=torch.Generator().manual_seed(5), dtype=F64) * 0.5
    m = torch.randn(7, 10, generator=torch.Generator().manual_seed(6), dtype=F64) * 0.4
    pairs = {
        "expmap0": (expmap0(u, c), ball.expmap0(u)),
        "logmap0": (logmap0(x, c), ball.logmap0(x)),
        "dist": (dist(x, y, c), ball.dist(x, y)),
        "radius": (radius(x, c), ball.dist0(x)),
        "mobius_add": (mobius_add(x, y, c), ball.mobius_add(x, y)),
        "mobius_matvec": (mobius_matvec(m, x, c), ball.mobius_matvec(m, x)),
        "project": (project(x * 3, c, eps=1e-5), ball.projx(x * 3)),
    }
    for name, (ours, theirs) in pairs.items():
        assert ours.dtype == F64, name
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), f"{name}: {(ours - theirs).abs().max()}"


def test_dist_is_the_distance_not_its_square():
    """d(0, x) along a line is 2/√c·artanh(√c‖x‖) (hgcn returns its square); a metric: symmetric, triangle."""
    x = torch.tensor([[0.5, 0.0]], dtype=F64)
    assert torch.allclose(dist(torch.zeros_like(x), x), 2 * torch.atanh(torch.tensor(0.5, dtype=F64)))
    a, b, z = _points(30, 5, 1.0, seed=7), _points(30, 5, 1.0, seed=8), _points(30, 5, 1.0, seed=9)
    assert torch.allclose(dist(a, b), dist(b, a), atol=1e-10)
    assert (dist(a, z) <= dist(a, b) + dist(b, z) + 1e-9).all()


def _near_boundary(n, d, c, seed, tightest):
    """Points at ‖x‖ = (1 − eps)/√c for eps from 1e-3 (the projection's margin) down to ``tightest``."""
    unit = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64), dim=-1)
    eps = torch.logspace(-3, tightest, n, dtype=F64).unsqueeze(-1)
    return unit * (1 - eps) / c ** 0.5


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_pairwise_dist_equals_the_elementwise_dist_and_geoopt_for_all_pairs(c):
    """All (N, M) pairs of interior, near-boundary and coincident points, to 1e-6 in float64; not squared.

    geoopt is compared up to the projection's margin (beyond it its own clamps cost it > 1e-6)."""
    ball = geoopt.PoincareBall(c=torch.tensor(c, dtype=F64))
    inner_x, inner_y = _points(20, 10, c, scale=0.5, seed=10), _points(15, 10, c, scale=0.5, seed=12)
    for tightest in (-3, -4):
        x = torch.cat([inner_x, _near_boundary(6, 10, c, 11, tightest)])
        y = torch.cat([inner_y, _near_boundary(6, 10, c, 13, tightest), x[-2:]])
        got = pairwise_dist(x, y, c)
        assert got.shape == (26, 23) and got.dtype == F64
        want = dist(x.unsqueeze(1), y.unsqueeze(0), c)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
        assert got.max() > 10 and got[-2, -2] < 1e-6 and got[-1, -1] < 1e-6  # sees the boundary; d(x, x) = 0
        if tightest == -3:
            theirs = ball.dist(x.unsqueeze(1), y.unsqueeze(0))
            assert torch.allclose(got, theirs, atol=1e-6, rtol=0), (got - theirs).abs().max()
    assert torch.allclose(pairwise_dist(torch.zeros(1, 10, dtype=F64), x, c)[0], radius(x, c), atol=1e-9)  # not squared
    batched = pairwise_dist(torch.stack([x, x.flip(0)]), torch.stack([y, y]), c)
    assert torch.allclose(batched[1], got.flip(0), atol=1e-12)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_pairwise_dist_gradients_equal_the_elementwise_ones(c):
    g = torch.Generator().manual_seed(14)
    x, y = (_points(12, 8, c, scale=0.7, seed=s).requires_grad_() for s in (15, 16))
    w = torch.randn(12, 12, generator=g, dtype=F64)  # a generic upstream gradient
    gx, gy = torch.autograd.grad((pairwise_dist(x, y, c) * w).sum(), (x, y))
    ex, ey = torch.autograd.grad((dist(x.unsqueeze(1), y.unsqueeze(0), c) * w).sum(), (x, y))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert torch.allclose(gx, ex, atol=1e-9) and torch.allclose(gy, ey, atol=1e-9)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_dist(a, b, c), (x[:4], y[:3]))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_pairwise_dist_is_finite_on_and_beyond_the_boundary(dtype):
    """Coincident, antipodal, on-boundary and outside points: finite values and gradients, in x's dtype."""
    unit = torch.nn.functional.normalize(torch.randn(4, 6, dtype=dtype), dim=-1)
    x = torch.cat([unit, unit * 3.0, torch.zeros(1, 6, dtype=dtype)]).requires_grad_()
    y = torch.cat([unit, -unit, 0.5 * unit]).requires_grad_()
    d = pairwise_dist(x, y)
    assert d.dtype == dtype and torch.isfinite(d).all()
    assert torch.isfinite(torch.cat([gr.flatten() for gr in torch.autograd.grad(d.sum(), (x, y))])).all()


def test_bad_curvature_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="c must be > 0"):
        expmap0(torch.ones(2), c=0.0)
    with pytest.raises(ValueError, match="G·k = 8"):
        block_mobius_matvec(torch.ones(2, 4, 4), torch.ones(3, 6))


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_block_op_backward_passes_gradcheck_in_float64(c):
    """The registered op's backward (the reference recomputed under autograd) against finite differences."""
    g = torch.Generator().manual_seed(0)
    blocks = (0.5 * torch.eye(3) + 0.2 * torch.randn(2, 3, 3, generator=g)).double().requires_grad_()
    x = (0.3 / c ** 0.5 * torch.randn(4, 6, generator=g)).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda b, v: block_mobius_matvec(b, v, c), (blocks, x))


def _shell(n, d, c, norm, seed):
    """n float64 points with √c‖x‖ = norm exactly (spread directions), plus copies and near copies of the first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=-1) * norm / c ** 0.5
    return torch.cat([x, x[:4], x[:4] + 1e-4 * torch.randn(4, d, generator=g, dtype=F64) / c ** 0.5])


def _spy_cdist(monkeypatch):
    seen, cdist = [], torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda a, b, **kw: seen.append(a.dtype) or cdist(a, b, **kw))
    return seen


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_pairwise_dist_float32_path_agrees_with_float64_inside_the_safe_radius(c, monkeypatch):
    """float32 inputs with √c‖·‖ <= FP32_SAFE_NORM (0.95) take the float32 path, within 2e-5 (abs) of float64."""
    seen = _spy_cdist(monkeypatch)
    for norm in (0.3, 0.8, FP32_SAFE_NORM - 1e-3):  # the last just inside (rounding, near copies)
        x, y = _shell(40, 384, c, norm, 1).float(), _shell(30, 384, c, norm * 0.9, 2).float()
        y[:4] = x[:4]  # coincident pairs
        fast = pairwise_dist(x, y, c)
        assert seen[-1] == torch.float32 and fast.dtype == torch.float32
        exact = pairwise_dist(x, y, c, precision="float64")
        assert seen[-1] == F64
        assert torch.allclose(fast.double(), exact.double(), atol=2e-5, rtol=0), (fast.double() - exact).abs().max()
        assert fast.diagonal()[:4].abs().max() < 1e-6  # coincident points at distance 0
    x, y = (_shell(6, 16, c, 0.7, s).float().requires_grad_() for s in (3, 4))
    w = torch.randn(14, 14, generator=torch.Generator().manual_seed(5))
    grads = [torch.autograd.grad((pairwise_dist(x, y, c, precision=p) * w).sum(), (x, y)) for p in ("auto", "float64")]
    assert seen[-2] == torch.float32
    for fast, exact in zip(*grads):
        assert torch.isfinite(fast).all() and torch.allclose(fast, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_pairwise_dist_near_the_boundary_keeps_the_float64_path(c, monkeypatch):
    """One point beyond the safe radius sends the whole call to float64: there float32 would be off by > 2e-5."""
    seen = _spy_cdist(monkeypatch)
    x, y = _shell(40, 64, c, 0.9999, 6).float(), _shell(30, 64, c, 0.9999, 7).float()
    exact = pairwise_dist(x.double(), y.double(), c)
    auto = pairwise_dist(x, y, c)
    assert seen[-1] == F64 and torch.allclose(auto.double(), exact, atol=1e-5, rtol=1e-6)
    forced = pairwise_dist(x, y, c, precision="float32")  # what the check protects against
    assert seen[-1] == torch.float32 and (forced.double() - exact).abs().max() > 2e-5
    inner = _shell(40, 64, c, 0.5, 8).float()
    pairwise_dist(torch.cat([inner, x[:1]]), inner, c)  # a single boundary point decides
    assert seen[-1] == F64
    pairwise_dist(inner.double(), inner.double(), c)  # float64 inputs are never narrowed
    assert seen[-1] == F64
    with pytest.raises(ValueError, match="precision must be"):
        pairwise_dist(x, y, c, precision="half")
