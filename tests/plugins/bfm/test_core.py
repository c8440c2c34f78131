"""BFM's mathematics on tiny real networks: K = 1 is flow matching, segment routing, the FRN, the samplers."""
from __future__ import annotations

import pytest
import torch

from blocktrain.plugins.bfm.core import BFMVelocity, bfm_loss, draw_times, frn_loss, frn_prediction, split_sizes
from blocktrain.plugins.bfm.model import BFM, segment_of
from blocktrain.trainer.generative.flow import fm_loss, interpolate, sample, segment_bounds, time_steps
from blocktrain.trainer.generative.layers import DiTBlock
from blocktrain.trainer.generative.models import SiT


def tiny_bfm(segments=3, **kw) -> BFM:
    torch.manual_seed(0)
    args = dict(image_size=8, channels=1, patch=2, hidden=32, heads=4, segments=segments, trunk_depth=2,
                segment_depth=1, frn_depth=1, num_classes=5, class_dropout=0.0, proj_hidden=32, align_dim=16)
    model = BFM(**{**args, **kw})
    with torch.no_grad():  # leave adaLN-Zero's identity start: every path must matter in these checks
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def batch(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g), \
        torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g)


def meta_fm_loss(velocity, x, y, t, eps):
    """Meta's flow_matching library on the same batch: its t' = 1 − t (t' = 1 data), x_0 = noise, x_1 = data."""
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    path = AffineProbPath(scheduler=CondOTScheduler()).sample(x_0=eps, x_1=x, t=1 - t)
    return torch.mean((velocity(path.x_t, 1 - path.t, y) - (-path.dx_t)) ** 2)


def test_flow_matching_loss_equals_meta_library():
    torch.manual_seed(0)
    model = SiT(8, 1, 2, 32, 2, 4, num_classes=5, class_dropout=0.0).eval()
    x, y, eps, t = batch()
    ours = fm_loss(model, x, y, t, eps)
    assert ours.item() > 0
    torch.testing.assert_close(ours, meta_fm_loss(model, x, y, t, eps), rtol=1e-6, atol=0)


def test_k1_loss_is_plain_flow_matching():
    model = tiny_bfm(segments=1)
    x, y, eps, u = batch()
    terms = bfm_loss(model, x, y, eps, u)
    assert list(terms) == ["velocity"]  # no encoder target: no alignment term
    torch.testing.assert_close(terms["velocity"], fm_loss(model, x, y, u, eps), rtol=0, atol=0)
    torch.testing.assert_close(terms["velocity"], meta_fm_loss(model, x, y, u, eps), rtol=1e-6, atol=0)


def plain_euler(velocity, x, y, steps):
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]).item() * velocity(x, torch.full((x.shape[0],), ts[i].item()), y, i)
    return x


@pytest.mark.parametrize("segments, per_segment", [(1, 6), (3, 2)])
def test_segment_sampler_is_euler_over_the_segments(segments, per_segment):
    model = tiny_bfm(segments=segments)
    noise, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 4])
    got = sample(BFMVelocity(model), noise, y, segments=segments, steps=per_segment)
    with torch.no_grad():
        expected = plain_euler(lambda x, t, y, i: model(x, t, y, segment=i // per_segment), noise, y,
                               segments * per_segment)
    assert got.nfe == segments * per_segment
    torch.testing.assert_close(got.x, expected, rtol=1e-5, atol=1e-6)
    if segments == 1:  # K = 1: the routed forward is the one network
        with torch.no_grad():
            torch.testing.assert_close(got.x, plain_euler(lambda x, t, y, i: model(x, t, y), noise, y, 6))


def test_split_sizes_and_times_per_segment():
    assert split_sizes(12, 4) == [3, 3, 3, 3]
    assert split_sizes(10, 4) == [3, 3, 2, 2] and sum(split_sizes(1537, 6)) == 1537
    u = torch.rand(1000)
    t, seg = draw_times(u, 6)
    sigma = segment_bounds(6)
    assert torch.bincount(seg).tolist() == split_sizes(1000, 6)
    assert (seg[1:] >= seg[:-1]).all()  # consecutive chunks
    assert ((t.double() >= sigma[seg + 1] - 1e-7) & (t.double() <= sigma[seg] + 1e-7)).all()
    inner = (t - t.round(decimals=0)).abs() > 1e-3
    assert (segment_of(t, 6)[inner] == seg[inner]).all()


def test_rows_of_a_chunk_only_touch_their_stack_and_every_stack_learns():
    model = tiny_bfm(segments=3)
    x, y, eps, u = batch(9)
    t, seg = draw_times(u, 3)
    xt = interpolate(x, eps, t)
    with torch.no_grad():
        before = model(xt, t, y, segment=seg)
        for p in model.stacks[1].parameters():
            p.add_(0.1)
        after = model(xt, t, y, segment=seg)
    changed = (after - before).flatten(1).abs().amax(1) > 0
    assert changed.tolist() == (seg == 1).tolist()

    model.train()
    terms = bfm_loss(model, x, y, eps, u, target=torch.randn(9, 16, 16))
    (terms["velocity"] + terms["align"]).backward()
    for k, stack in enumerate(model.stacks):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters()), f"stack {k}"
    assert all(p.grad.abs().sum() > 0 for p in model.trunk_blocks.parameters())  # h is not detached
    assert all(p.grad is None for p in model.frn_blocks.parameters())


def test_frn_starts_each_segment_at_the_trunk_and_coeff_in_unit_interval():
    model = tiny_bfm(segments=3)
    x, y, eps, _ = batch(6)
    seg = torch.tensor([0, 0, 1, 1, 2, 2])
    sigma = segment_bounds(3).float()
    t_start = sigma[seg]
    pred, h = frn_prediction(model, x, y, eps, t_start, seg)
    with torch.no_grad():
        h_start = model.trunk(interpolate(x, eps, t_start), model.condition(t_start, y))
    torch.testing.assert_close(pred, h_start, rtol=0, atol=0)  # ĥ(t_start) = h(x_{t_start}, t_start)
    torch.testing.assert_close(pred, h)
    mid = (sigma[seg] + sigma[seg + 1]) / 2
    pred_mid, h_mid = frn_prediction(model, x, y, eps, mid, seg)
    assert not torch.allclose(pred_mid, h_mid)  # an untrained FRN is not exact inside the segment


def test_frn_sampler_equals_full_sampler_with_an_exact_frn_and_counts_blocks(monkeypatch):
    model = tiny_bfm(segments=3, trunk_depth=3, segment_depth=2, frn_depth=1)
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 3])
    full = sample(BFMVelocity(model), noise, y, segments=3, steps=4)
    approx = sample(BFMVelocity(model, frn=True), noise, y, segments=3, steps=4)
    assert not torch.allclose(full.x, approx.x)

    calls = []
    for block in model.modules():
        if isinstance(block, DiTBlock):
            block.register_forward_hook(lambda *a: calls.append(1))
    with monkeypatch.context() as m:  # the oracle FRN: ĥ = h(x_t, t) exactly
        m.setattr(model, "frn", lambda x, c, h_start, coeff: model.trunk(x, c))
        oracle = sample(BFMVelocity(model, frn=True), noise, y, segments=3, steps=4)
    torch.testing.assert_close(oracle.x, full.x, rtol=0, atol=0)
    calls.clear()
    sample(BFMVelocity(model, frn=True), noise, y, segments=3, steps=4)
    n = 4  # per segment: trunk + velocity once, then (n − 1)·(FRN + velocity)
    assert len(calls) == 3 * ((3 + 2) + (n - 1) * (1 + 2))


def test_frn_loss_trains_only_the_frn_and_decreases():
    model = tiny_bfm(segments=2).train()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("frn_")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y, eps, u = batch(8)
    first = frn_loss(model, x, y, eps, u).item()
    for _ in range(10):
        opt.zero_grad()
        frn_loss(model, x, y, eps, u).backward()
        opt.step()
    assert frn_loss(model, x, y, eps, u).item() < 0.7 * first
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_few_steps_lower_the_bfm_loss():
    model = tiny_bfm(segments=2).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, y, eps, u = batch(16)
    target = torch.randn(16, 16, 16)

    def total():
        terms = bfm_loss(model, x, y, eps, u, target)
        return terms["velocity"] + 0.05 * terms["align"]

    first = total().item()
    for _ in range(12):
        opt.zero_grad()
        total().backward()
        opt.step()
    assert total().item() < 0.8 * first


# -- samplers ----------------------------------------------------------------------------------------
def gaussian_velocity(s: float):
    """The exact velocity E[ε − x | x_t] for data ~ N(0, s²): x_t·(t − (1 − t)s²) / ((1 − t)²s² + t²)."""
    def v(x, t, y, segment, first):
        t = t.view(-1, *[1] * (x.dim() - 1))
        return x * (t - (1 - t) * s ** 2) / ((1 - t) ** 2 * s ** 2 + t ** 2)
    return v


@pytest.mark.parametrize("method", ["euler", "heun", "sde"])
def test_samplers_reach_the_data_distribution(method):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=g)
    out = sample(gaussian_velocity(0.5), noise, torch.zeros(20000, dtype=torch.long), segments=2, steps=40,
                 method=method, generator=g)
    assert out.x.std().item() == pytest.approx(0.5, rel=0.03)
    assert out.nfe == (160 if method == "heun" else 80)


def test_heun_is_more_accurate_than_euler():
    def v(x, t, y, segment, first):  # dx/dt = x: x(0) = x(1)·e^{-1}
        return x
    x1, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    exact = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    euler = (sample(v, x1, y, steps=10).x - exact).abs().item()
    heun = (sample(v, x1, y, steps=10, method="heun").x - exact).abs().item()
    assert heun < euler / 10


def test_sde_steps_cover_the_path_once_and_end_deterministically():
    plan = time_steps(3, 4, "sde")
    assert [s.t for s in plan][0] == 1.0 and plan[-1].t_next == 0.0
    assert all(a.t_next == b.t for a, b in zip(plan, plan[1:]))  # contiguous: no interval taken twice
    assert [s.stochastic for s in plan] == [True] * 11 + [False]
    assert (plan[-1].t, plan[-1].t_next) == (pytest.approx(0.04), 0.0)
    faithful = time_steps(3, 4, "sde", repeat_last=True)  # the official code's bug, kept behind a switch
    assert faithful[:-1] == plan and (faithful[-1].t, faithful[-1].t_next) == (0.04, 0.0)

    model = tiny_bfm(segments=3)
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    runs = [sample(BFMVelocity(model), noise, y, segments=3, steps=4, method="sde", repeat_last=r,
                   generator=torch.Generator().manual_seed(0)) for r in (False, True)]
    assert (runs[0].nfe, runs[1].nfe) == (12, 13)
    last = BFMVelocity(model)(runs[0].x, torch.full((2,), 0.04), y, 2, False)
    torch.testing.assert_close(runs[1].x, runs[0].x - 0.04 * last, rtol=1e-5, atol=1e-6)


def test_guidance_scale_one_is_the_conditional_model_and_interval_applies():
    model = tiny_bfm(segments=2)
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    cond = sample(BFMVelocity(model), noise, y, segments=2, steps=2)
    assert torch.equal(sample(BFMVelocity(model), noise, y, segments=2, steps=2, cfg_scale=1.0).x, cond.x)
    outside = sample(BFMVelocity(model), noise, y, segments=2, steps=2, cfg_scale=4.0, null_class=5, guidance=(0.0, 0.1))
    torch.testing.assert_close(outside.x, cond.x, rtol=1e-5, atol=1e-6)  # guidance never active
    inside = sample(BFMVelocity(model), noise, y, segments=2, steps=2, cfg_scale=4.0, null_class=5)
    assert not torch.allclose(inside.x, cond.x, atol=1e-4)
