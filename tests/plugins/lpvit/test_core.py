"""LPViT's mathematics on small layers and a tiny Llama: block masks, curves against brute force and against a port
of the official loop, the allocation's budget and cap, the ``faithful`` switches, fixed masks through AdamW."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from blocktrain.plugins.lpvit import curves as C
from blocktrain.plugins.lpvit.pruner import (LayerStats, LPViTSettings, _lagrangian_amounts, allocate, build_costs,
                                            flops_ratio, gradient_statistic, lpvit_prune)
from blocktrain.trainer.compression.fixed_masks import attach_masks, find_weight_layers, mask_optimizer
from tests.pruning.conftest import tiny_llama, token_batches


def block_means_by_hand(score: torch.Tensor, block) -> torch.Tensor:
    nr, nc = math.ceil(score.shape[0] / block[0]), math.ceil(score.shape[1] / block[1])
    return torch.tensor([[score[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].mean().item()
                          for j in range(nc)] for i in range(nr)], dtype=torch.float64)


@pytest.mark.parametrize("shape,block", [((16, 24), (8, 8)), ((20, 13), (8, 4)), ((6, 3, 2, 2), (4, 4))])
def test_block_mask_keeps_the_top_blocks_with_ceil_mode_edges(shape, block):
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    scores = C.block_scores(w, g, block)
    by_hand = block_means_by_hand((w * g).abs().reshape(shape[0], -1).double(), block)
    torch.testing.assert_close(scores, by_hand)
    order = C.block_order(scores)
    for amount in (0.0, 0.3, 0.5, 0.99):
        mask = C.block_mask(order, amount, w.shape, block)
        assert mask.shape == w.shape
        kept = block_means_by_hand(mask.reshape(shape[0], -1).double(), block)
        assert set(kept.flatten().tolist()) <= {0.0, 1.0}  # whole blocks, edge blocks included
        n = scores.numel()
        assert int(kept.sum()) == (n if amount == 0 else int((1 - amount) * n))
        if 0 < kept.sum() < n:
            assert scores[kept == 1].min() >= scores[kept == 0].max()


def brute_curve(w, g, order, block, grid, damp):
    """δ(a) by explicit matrices: mean((Δw ⊙ g)²) + ½ Δwᵀ (g gᵀ + λI) Δw."""
    wf, gf = w.double().flatten(), g.double().flatten()
    H = torch.outer(gf, gf) + damp * torch.eye(wf.numel(), dtype=torch.float64)
    out = []
    for d in range(grid + 1):
        dw = (w * C.block_mask(order, d / grid, w.shape, block)).double().flatten() - wf
        out.append(((dw * gf) ** 2).mean() + 0.5 * dw @ H @ dw)
    return torch.stack(out)


def official_incremental_curve(w, g, order, block, grid, damp):
    """A port of the official loop (``gen_rd_curves_block_approx`` with ``hessian_deltaw``)."""
    wf, gf = w.double().flatten(), g.double().flatten()
    out, prev, second = [], None, 0.0
    for d in range(grid + 1):
        pruned = (w * C.block_mask(order, d / grid, w.shape, block)).double().flatten()
        dw = pruned - wf
        if d > 0:
            ddw = pruned - prev
            nz = ddw.nonzero().flatten()
            hd = gf.view(-1, 1) @ (gf[nz].view(1, -1) @ ddw[nz]).view(1, 1)
            hd = hd.flatten()
            hd[nz] += damp
            second += float(0.5 * (ddw + 2 * dw) @ hd)
        prev = pruned
        out.append(float(((dw * gf) ** 2).mean()) + second)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape,block", [((8, 12), (4, 4)), ((10, 7), (4, 3))])
def test_second_order_closed_form_and_incremental_match_brute_force_and_code(shape, block):
    gen = torch.Generator().manual_seed(1)
    w, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    order = C.block_order(C.block_scores(w, g, block))
    damp, grid = 1e-2, 20
    closed = C.distortion_curve(w, g, order, block, grid, True, damp, incremental=False)
    torch.testing.assert_close(closed, brute_curve(w, g, order, block, grid, damp))
    incremental = C.distortion_curve(w, g, order, block, grid, True, damp, incremental=True)
    torch.testing.assert_close(incremental, official_incremental_curve(w, g, order, block, grid, damp))
    assert (incremental - closed).abs().max() > 1e-3  # the code's over-count is real
    first = C.distortion_curve(w, g, order, block, grid, False)
    torch.testing.assert_close(first, brute_curve(w, g, order, block, grid, 0.0) - 0.5 * torch.stack(
        [(g.double().flatten() @ ((w * C.block_mask(order, d / grid, w.shape, block)).double() - w).flatten()) ** 2
         for d in range(grid + 1)]))


def test_derivative_is_the_coded_stencil():
    xs = torch.arange(11, dtype=torch.float64) / 10
    ys = xs ** 3
    d = C.derivative(xs, ys, 4)
    assert d.shape == (10,)
    torch.testing.assert_close(d[4:7], 3 * xs[4:7] ** 2)  # h_i = 4: the 5-point stencil is exact on cubics
    torch.testing.assert_close(d[0], (ys[1] - ys[0]) / 0.1)  # one-sided at the start
    assert d[3] == pytest.approx(float((-ys[6] + 8 * ys[4] - 8 * ys[2] + ys[0]) / (6 * 0.3)))  # odd h_i = 3, as coded
    torch.testing.assert_close(d[9], (ys[10] - ys[8]) / 0.2)  # central at the end


def test_ema_smooth_is_debiased():
    torch.testing.assert_close(C.ema_smooth(torch.full((5,), 3.0, dtype=torch.float64), 0.9),
                               torch.full((5,), 3.0, dtype=torch.float64))
    out = C.ema_smooth(torch.tensor([1.0, 2.0], dtype=torch.float64), 0.5)
    assert out.tolist() == pytest.approx([1.0, (0.25 + 1.0) / 0.75])


def test_power_curve_and_auto_beta():
    p = C.power_curve(64 * 48, (8, 8), 48, grid=10)
    assert p[5].item() == pytest.approx(0.5 * 48 * 3)
    amounts = torch.arange(11, dtype=torch.float64) / 10
    dists = [amounts ** 2, 2 * amounts ** 2]
    powers = [C.power_curve(64, (8, 8), 32, 10), C.power_curve(128, (8, 8), 32, 10)]
    expected = (sum(float(C.derivative(amounts, d, 10).max()) for d in dists) / 2) / (
        sum(float(C.derivative(amounts, q, 10).max()) for q in powers) / 2)
    assert C.auto_beta(amounts, dists, powers) == pytest.approx(expected)
    assert C.auto_beta(amounts, dists, [C.power_curve(64, (8, 8), 15, 10)] * 2) == 0.0  # inputs < 16 wide


def test_gradient_statistic_is_the_mean_squared_logit_gradient_in_train_mode():
    model, batches = tiny_llama(), token_batches(2)
    names = find_weight_layers(model, exclude=("lm_head",))
    sums, shapes = gradient_statistic(model, names, batches)
    assert not model.training  # mode restored
    model.train()
    for batch in batches:
        model(**batch).logits.pow(2).mean().backward()
    for n in names:
        torch.testing.assert_close(sums[n], model.get_submodule(n).weight.grad, rtol=1e-4, atol=1e-9)
    assert shapes["model.layers.0.mlp.down_proj"] == (16, 64)  # 16 tokens per sample, 64 inputs


def test_gradient_statistic_runs_without_stochastic_depth():
    import timm

    def vit(rate):
        torch.manual_seed(0)
        return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=2,
                                 num_classes=3, drop_path_rate=rate)

    model, reference = vit(0.9), vit(0.0)
    names = find_weight_layers(model)
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with_rate, _ = gradient_statistic(model, names, batches)
    without, _ = gradient_statistic(reference, names, batches)
    for n in names:  # a train-mode pass with 0.9 stochastic depth would drop most residual branches
        torch.testing.assert_close(with_rate[n], without[n], rtol=1e-5, atol=1e-8)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.9)  # restored for the fine-tune
    model.train()
    assert not torch.allclose(model(batches[0]), model(batches[0]))  # (it is on outside the pass)
    assert "head_dist" in names and with_rate["head_dist"].abs().sum() > 0  # the averaged output reaches both heads


@pytest.fixture(scope="module")
def pruned():
    model, batches = tiny_llama(), token_batches(2)
    names = find_weight_layers(model, exclude=("lm_head",))
    s = LPViTSettings(flops=0.5, block=(8, 8), grid=100, h=4)
    masks, info = lpvit_prune(model, batches, s, names)
    return model, batches, names, s, masks, info


def test_masks_keep_the_top_blocks_at_each_allocated_amount_and_hit_the_budget(pruned):
    model, batches, names, s, masks, info = pruned
    assert set(masks) == set(names)
    sums, shapes = gradient_statistic(model, names, batches)
    flops = dense = 0.0
    for n in names:
        w, g = model.get_submodule(n).weight, sums[n] / len(batches)
        scores = C.block_scores(w, g, s.block)
        kept = block_means_by_hand(masks[n].double(), s.block)
        assert int(kept.sum()) == C.kept_blocks(scores.numel(), info["amounts"][n])
        if 0 < kept.sum() < kept.numel():
            assert scores[kept == 1].min() >= scores[kept == 0].max()
        flops += float(masks[n].sum()) * shapes[n][0]
        dense += w.numel() * shapes[n][0]
    assert abs(flops / dense - 0.5) <= s.tolerance
    assert info["flops"] == pytest.approx(flops / dense)
    assert len(set(info["amounts"].values())) > 1  # a real allocation, not uniform


def synthetic(n_layers=6, n_blocks=100):
    """Convex curves c_l·a² on layers of 100 blocks of 64 weights (a = 0, .01, ..., 1)."""
    amounts = torch.arange(101, dtype=torch.float64) / 100
    stats = {f"l{i}": LayerStats(None, torch.arange(n_blocks), torch.full((n_blocks,), 64), positions=1 + i,
                                 in_channels=64, bias=0) for i in range(n_layers)}
    costs = {f"l{i}": (i + 1.0) * amounts ** 2 for i in range(n_layers)}
    return stats, costs


@pytest.mark.parametrize("flops", [0.3, 0.5, 0.8])
def test_equal_slope_allocation_reaches_the_budget(flops):
    stats, costs = synthetic()
    amounts, slope = allocate(costs, stats, LPViTSettings(flops=flops, tolerance=0.005))
    assert abs(flops_ratio(stats, amounts) - flops) <= 0.005
    # equal slopes: a layer with a steeper curve (larger c) is pruned less
    values = [amounts[f"l{i}"] for i in range(6)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]


def test_exact_stencil_is_exact_on_lines_and_the_coded_one_is_not():
    amounts = torch.arange(101, dtype=torch.float64) / 100
    line = 7.0 * amounts
    exact = C.derivative(amounts, line, 4, exact=True)
    torch.testing.assert_close(exact, torch.full_like(exact, 7.0))
    coded = C.derivative(amounts, line, 4)
    assert coded[3] == pytest.approx(7.0 * 10 / 18) and coded[97] == pytest.approx(7.0 * 10 / 18)  # h_i = 3
    assert coded[50] == pytest.approx(7.0)


@pytest.mark.parametrize("select", ["slope", "lagrangian"])
def test_convex_curves_with_a_linear_term_get_interior_amounts_at_equal_slopes(select):
    """Two layers of equal FLOPs, C = c·a² + 20a (a power-like linear term): equal slopes 2c₁a₁ = 2c₂a₂ with
    a₁ + a₂ = 1 give a₁ = c₂/(c₁ + c₂). The coded stencil reads 0.56 of the slope at a = 0.03 and 0.97, which
    below 20 are the smallest derivatives, so it returns the extremes (0.95 and 0.03)."""
    amounts_grid = torch.arange(101, dtype=torch.float64) / 100
    stats = {n: LayerStats(None, torch.arange(100), torch.full((100,), 64), 1, 64, 0) for n in "xy"}
    costs = {"x": 1.0 * amounts_grid ** 2 + 20 * amounts_grid, "y": 3.0 * amounts_grid ** 2 + 20 * amounts_grid}
    amounts, slope = allocate(costs, stats, LPViTSettings(flops=0.5, tolerance=0.005, faithful=False, select=select))
    assert amounts == pytest.approx({"x": 0.75, "y": 0.25}, abs=0.011)
    assert 2 * 1.0 * amounts["x"] == pytest.approx(2 * 3.0 * amounts["y"], abs=0.07)  # the curves' slopes agree
    if select == "slope":
        coded, _ = allocate(costs, stats, LPViTSettings(flops=0.5, tolerance=0.005, faithful=True))
        assert coded == {"x": 0.95, "y": 0.03}


def test_lagrangian_selection_is_monotone_on_noisy_curves():
    stats, costs = synthetic()
    gen = torch.Generator().manual_seed(0)
    noisy = {n: c + 0.02 * torch.randn(c.shape, generator=gen, dtype=torch.float64) for n, c in costs.items()}
    s = LPViTSettings(flops=0.5, tolerance=0.01, select="lagrangian", faithful=False)
    amounts, _ = allocate(noisy, stats, s)
    assert abs(flops_ratio(stats, amounts) - 0.5) <= 0.01
    grid = torch.arange(101, dtype=torch.float64) / 100
    picks = [_lagrangian_amounts(list(noisy.values()), grid, 2.0 ** e, 0.95) for e in torch.linspace(-4, 4, 33)]
    for layer in range(len(noisy)):
        column = [p[layer] for p in picks]
        assert column == sorted(column) and column[0] < column[-1]


def test_min_density_cap_holds():
    stats, costs = synthetic()
    s = LPViTSettings(flops=0.02, min_density=0.3)
    amounts, _ = allocate(costs, stats, s)
    cap = min(0.3, (1 - 0.02) / 2)
    assert max(amounts.values()) == pytest.approx(1 - cap)  # the cap binds at this budget
    for name, st in stats.items():
        assert amounts[name] <= 1 - cap + 1e-12
        kept = C.block_mask(st.order, amounts[name], torch.Size([10 * 8, 10 * 8]), (8, 8))
        assert float(kept.float().mean()) >= cap - 1e-9


def test_faithful_switches_change_only_the_documented_quirks(pruned):
    model, batches, names, _, _, _ = pruned
    sums, shapes = gradient_statistic(model, names, batches)
    grads = {n: sums[n] / len(batches) for n in names}
    # power sign and stencil only (no second-order term): the distortion is the same, the power term flips
    a = build_costs(model, grads, shapes, LPViTSettings(block=(8, 8), second_order=False, faithful=True))[1]
    b = build_costs(model, grads, shapes, LPViTSettings(block=(8, 8), second_order=False, faithful=False))[1]
    grid = torch.arange(101, dtype=torch.float64) / 100
    dists, powers = list(a["distortion"].values()), list(a["power"].values())
    assert a["beta"] == C.auto_beta(grid, dists, powers) > 0  # β differs only by the stencil
    assert b["beta"] == C.auto_beta(grid, dists, powers, exact=True) > 0
    for n in names:
        torch.testing.assert_close(a["distortion"][n], b["distortion"][n])
        torch.testing.assert_close(a["total"][n], a["distortion"][n] + a["beta"] * a["power"][n])
        torch.testing.assert_close(b["total"][n], b["distortion"][n] - b["beta"] * b["power"][n])
    # second-order update only (no power, no smoothing): incremental vs closed form, first-order part equal
    s_f = LPViTSettings(block=(8, 8), power=False, smooth=None, faithful=True)
    s_c = LPViTSettings(block=(8, 8), power=False, smooth=None, faithful=False)
    f, c = build_costs(model, grads, shapes, s_f)[1], build_costs(model, grads, shapes, s_c)[1]
    n = names[0]
    w = model.get_submodule(n).weight.detach()
    order = C.block_order(C.block_scores(w, grads[n], (8, 8)))
    torch.testing.assert_close(f["total"][n], official_incremental_curve(w, grads[n], order, (8, 8), 100, 1e-7))
    torch.testing.assert_close(c["total"][n], brute_curve(w, grads[n], order, (8, 8), 100, 1e-7))


def test_fixed_masks_survive_adamw_with_polluted_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(32, 8)
    model(x).pow(2).mean().backward()
    opt.step()  # dense step: state is non-zero everywhere
    keep = {"0": torch.rand(16, 8) > 0.5, "2": torch.rand(4, 16) > 0.5}
    attach_masks(model, keep)
    mask_optimizer(model, opt)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        assert (model[0].weight.grad[~keep["0"]] == 0).all()
        opt.step()
    for name, k in keep.items():
        weight = model.get_submodule(name).weight
        assert (weight[~k] == 0).all() and (weight[k] != 0).all()
        for value in opt.state[weight].values():
            if value.shape == k.shape:
                assert (value[~k] == 0).all()
    assert model[0].weight_mask.dtype == torch.bool and "0.weight_mask" in model.state_dict()


def test_normalized_search_is_scale_free():
    stats, costs = synthetic()
    s = LPViTSettings(flops=0.5, tolerance=0.005)
    amounts, slope = allocate(costs, stats, s)
    tiny, tiny_slope = allocate({n: c * 1e-9 for n, c in costs.items()}, stats, s)
    assert tiny == amounts and tiny_slope == pytest.approx(slope + math.log2(1e-9))
    raw, _ = allocate(costs, stats, LPViTSettings(flops=0.5, tolerance=0.005, normalize=False))
    assert abs(flops_ratio(stats, raw) - 0.5) <= 0.005  # the code's search reaches the budget here too
