"""CBQ's pieces against their definitions: LoRA-Rounding and AdaRound's V0, hard rounding vs round-to-nearest,
the regulariser and its β schedule, the sliding-window schedule, the homologous loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocktrain.kernels.fake_quant import fake_quant, rectified_sigmoid
from blocktrain.plugins.cbq.loss import distance, homologous_loss
from blocktrain.plugins.cbq.rounding import BetaSchedule, LoraRounding, adaround_v0, hard_codes, rounding_regularizer
from blocktrain.plugins.cbq.windows import window_schedule
from blocktrain.trainer.compression.quant import QuantSpec, expand_groups, minmax_qparams, qrange, quantize


def _weight(out=12, cols=20, seed=0):
    return torch.randn(out, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("group_size", [None, 5])
def test_v0_makes_h_the_fractional_part_and_soft_rounding_the_identity_inside_the_grid(group_size):
    w, spec = _weight(), QuantSpec(4, False, group_size)
    scale, zero = minmax_qparams(w, spec)
    v0 = adaround_v0(w, scale)
    t = w / expand_groups(scale, w.shape[1])
    torch.testing.assert_close(rectified_sigmoid(v0), t - torch.floor(t), atol=1e-5, rtol=0)
    soft = fake_quant(w, scale, zero, *qrange(spec), v=v0)
    inside = (t + expand_groups(zero, w.shape[1]) >= 0) & (t + expand_groups(zero, w.shape[1]) <= 15)
    torch.testing.assert_close(soft[inside], w[inside], atol=1e-6, rtol=0)


def test_lora_rounding_at_full_rank_reproduces_v0_and_is_the_best_rank_r_fit_below():
    """The literal reading (no frozen base): V = A1·A2 is V0 at full rank, its Eckart–Young fit below."""
    w = _weight()
    scale, _ = minmax_qparams(w, QuantSpec(4))
    v0 = adaround_v0(w, scale)
    full = LoraRounding(v0, rank=min(v0.shape), frozen_base=False)
    torch.testing.assert_close(full(), v0, atol=1e-4, rtol=0)
    assert full.a1.shape == (12, 12) and full.a2.shape == (12, 20)
    low = LoraRounding(v0, rank=3, frozen_base=False)
    sv = torch.linalg.svdvals(v0.double())
    err = float(torch.linalg.norm(low().detach().double() - v0.double()))
    assert err == pytest.approx(float(sv[3:].pow(2).sum().sqrt()), rel=1e-4)  # Eckart–Young
    assert sum(p.numel() for p in low.parameters()) == (12 + 20) * 3
    adaround = LoraRounding(v0, rank=0)
    assert torch.equal(adaround(), v0) and sum(p.numel() for p in adaround.parameters()) == v0.numel()
    zero = LoraRounding(v0, rank=3, init="zero", generator=torch.Generator().manual_seed(0), frozen_base=False)
    assert torch.equal(zero(), torch.zeros_like(v0)) and float(zero.a2.detach().abs().sum()) > 0  # V = 0: h = 1/2


@pytest.mark.parametrize("init", ["svd", "zero"])
def test_the_frozen_base_starts_every_rank_at_v0_and_only_the_factors_train(init):
    w = _weight()
    scale, _ = minmax_qparams(w, QuantSpec(4))
    v0 = adaround_v0(w, scale)
    low = LoraRounding(v0, rank=3, init=init, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(low(), v0, atol=1e-5, rtol=0)
    assert [n for n, _ in low.named_parameters()] == ["a1", "a2"] and not low.base.requires_grad
    low().sum().backward()
    assert low.a2.grad is not None and low.base.grad is None


@pytest.mark.parametrize("rank", [0, 3])
def test_hard_rounding_of_v0_is_round_to_nearest_within_one_step(rank):
    w = _weight(seed=2)
    spec = QuantSpec(3, False, 10)
    scale, zero = minmax_qparams(w, spec)
    lo, hi = qrange(spec)
    rtn = quantize(w, scale, zero, spec)
    v = LoraRounding(adaround_v0(w, scale), rank=rank)().detach()
    codes = hard_codes(w, scale, zero, v, lo, hi)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert int((codes - rtn).abs().max()) <= 1
    if rank == 0:  # V0 itself: 1[V0 >= 0] = 1[frac >= 1/2], i.e. round to nearest away from the x.5 ties
        t = w / expand_groups(scale, w.shape[1])
        tie = (t - torch.floor(t)) == 0.5
        assert torch.equal(codes[~tie], rtn[~tie])


def test_hard_rounding_rounds_exact_ties_up_where_torch_rounds_to_even():
    w, scale, zero = torch.tensor([[0.5, 1.5, 2.5, 0.25]]), torch.tensor([[1.0]]), torch.tensor([[0.0]])
    v0 = adaround_v0(w, scale)
    assert torch.equal(hard_codes(w, scale, zero, v0, 0, 15), torch.tensor([[1, 2, 3, 0]], dtype=torch.int32))
    assert torch.equal(quantize(w, scale, zero, QuantSpec(4)), torch.tensor([[0, 2, 2, 0]], dtype=torch.int32))


def test_regulariser_and_beta_schedule():
    v = torch.tensor([-50.0, 50.0, 0.0])  # h = 0, 1, 1/2
    assert float(rounding_regularizer(v, 20.0)) == pytest.approx(1.0)
    assert float(rounding_regularizer(v[:2], 2.0)) == 0.0
    h = rectified_sigmoid(torch.tensor([0.3]))
    assert float(rounding_regularizer(torch.tensor([0.3]), 2.0)) == pytest.approx(float(1 - (2 * h - 1).abs() ** 2))
    beta = BetaSchedule(steps=100, warmup=0.2, start=20.0, end=2.0)
    assert all(beta(t) is None for t in range(20))  # no regulariser during the warm-up
    assert beta(20) == 20.0 and beta(60) == pytest.approx(11.0) and beta(100) == 2.0
    values = [beta(t) for t in range(20, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))  # linear decay 20 -> 2
    assert BetaSchedule(10, warmup=0.0)(0) == 20.0


def _membership(windows, n):
    return [sum(w.start <= b < w.stop for w in windows) for b in range(n)]


@pytest.mark.parametrize("n", [2, 3, 6, 7])
def test_two_blocks_overlap_one_puts_every_middle_block_in_two_windows(n):
    windows = window_schedule(n, 2, 1)
    assert [(w.start, w.stop) for w in windows] == [(i, i + 2) for i in range(n - 1)]
    assert _membership(windows, n) == [1] + [2] * (n - 2) + [1]
    finalized = [b for w in windows for b in w.finalize]
    assert finalized == list(range(n))  # each block finalised exactly once, in order, when it leaves the window


@pytest.mark.parametrize("n", [1, 4])
def test_window_one_overlap_zero_is_block_wise(n):
    windows = window_schedule(n, 1, 0)
    assert [(w.start, w.stop, w.finalize) for w in windows] == [(b, b + 1, (b,)) for b in range(n)]


def test_other_windows_cover_every_block_and_bad_ones_are_refused():
    windows = window_schedule(5, 3, 1)
    assert [(w.start, w.stop, w.finalize) for w in windows] == [(0, 3, (0, 1)), (2, 5, (2, 3, 4))]
    assert [(w.start, w.stop) for w in window_schedule(2, 4, 2)] == [(0, 2)]
    with pytest.raises(ValueError, match="overlap < size"):
        window_schedule(4, 2, 2)


def test_distance_is_squared_l2_plus_kl_over_the_hidden_dimension():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    p, q = a.softmax(-1), b.softmax(-1)
    by_hand = ((a - b) ** 2).sum(-1).mean() + (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distance(a, b), by_hand)
    torch.testing.assert_close(distance(a, b, kl_weight=0.0), ((a - b) ** 2).sum(-1).mean())
    assert float(distance(a, a)) == pytest.approx(0.0, abs=1e-6)
    c = torch.randn(2, 3, 8, generator=gen)
    torch.testing.assert_close(homologous_loss(b, a, c), distance(a, b) + distance(c, b))
    torch.testing.assert_close(homologous_loss(b, a, None), distance(a, b))
    assert float(F.kl_div(q.log(), p.log(), reduction="none", log_target=True).sum(-1).mean()) > 0
