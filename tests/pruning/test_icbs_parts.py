"""iCBS building blocks: the QUBO identity, pre-processing, tabu list, step allocation, block selection,
and per-sample gradients from one backward."""
from __future__ import annotations

import collections
import math

import pytest
import torch

from blocktrain.plugins.icbs import (TabuList, allocate_steps, block_qubo, capture_io_grads,
                                     init_layer_state, mean_weight_grad, move_delta, per_sample_block_grads,
                                     quadratic_loss_change, scale_and_cutoff, select_block, split_batch)
from blocktrain.trainer.tasks.language import causal_lm_sample_losses

from .conftest import tiny_llama, token_batches


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_qubo_energy_equals_the_quadratic_model(ridge):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = int(torch.randint(2, 12, (1,), generator=gen))
        w0 = torch.randn(b, generator=gen, dtype=torch.float64)
        current = torch.rand(b, generator=gen) < 0.5
        dw = torch.where(current, -w0, 0.0)  # the current block weights: w0 or 0
        g = torch.randn(b, generator=gen, dtype=torch.float64)
        G = torch.randn(5, b, generator=gen, dtype=torch.float64)
        H = G.T @ G / 5
        gamma = float(torch.rand(1, generator=gen))
        Q, const = block_qubo(w0, dw, g, H, gamma, ridge)
        for _ in range(5):
            x = (torch.rand(b, generator=gen) < 0.5).double()
            delta = w0 * (1 - x) - (w0 + dw)
            assert torch.allclose(delta, move_delta(x, w0, dw))
            direct = gamma * g @ delta + 0.5 * delta @ H @ delta + ridge * delta @ delta
            assert math.isclose(const + float(x @ Q @ x), float(direct), rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(quadratic_loss_change(delta, g, H, gamma, ridge), float(direct), rel_tol=1e-12)


def test_scaling_and_the_two_cutoffs():
    Q = torch.tensor([[2.0, -1.0, 1e-14], [-1.0, -3.0, 0.0], [1e-14, 0.0, 4.0]])
    faithful, s = scale_and_cutoff(Q, faithful=True)
    nonzero = Q[Q != 0].abs()
    assert s == pytest.approx(1 / float(nonzero.mean()))
    assert torch.equal(faithful, torch.where(Q * s <= 1e-12, 0.0, Q * s))  # negatives zeroed too
    fixed, _ = scale_and_cutoff(Q, faithful=False)
    assert torch.equal(fixed, torch.where((Q * s).abs() <= 1e-12, 0.0, Q * s))
    assert (fixed < 0).sum() == 3 and (faithful < 0).sum() == 0
    assert scale_and_cutoff(torch.zeros(3, 3))[1] is None


def test_tabu_list_behaves_like_a_bounded_deque():
    gen = torch.Generator().manual_seed(1)
    tabu, ref = TabuList(50, 13), collections.deque(maxlen=13)
    for _ in range(40):
        idx = torch.randint(0, 50, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen)
        tabu.extend(idx)
        ref.extend(idx.tolist())
        assert tabu.items() == list(ref)
        assert torch.equal(tabu.mask(), torch.isin(torch.arange(50), torch.tensor(list(ref))))
    again = TabuList(50, 13)
    again.load_state_dict(tabu.state_dict())
    assert again.items() == list(ref) and torch.equal(again.mask(), tabu.mask())


def test_steps_follow_log10_sizes_with_a_minimum_and_sum_to_the_total():
    numels = {"a": 10, "b": 100, "c": 10 ** 6, "d": 10 ** 3}
    plan = allocate_steps(numels, 100, 1, torch.Generator().manual_seed(0))
    counts = collections.Counter(plan)
    assert len(plan) == 100
    assert [counts[n] for n in "abcd"] == [8, 17, 50, 25]
    assert plan != sorted(plan)
    assert plan == allocate_steps(numels, 100, 1, torch.Generator().manual_seed(0))
    counts = collections.Counter(allocate_steps(numels, 100, 12, torch.Generator().manual_seed(0)))
    assert sum(counts.values()) == 100 and min(counts.values()) >= 11
    with pytest.warns(UserWarning, match="fewer"):
        assert len(allocate_steps(numels, 6, 2, torch.Generator())) == 6
    few = allocate_steps({f"l{i}": 100 for i in range(14)}, 2, 0, torch.Generator())  # every share rounds to 0
    assert len(few) == 2 and len(set(few)) == 2


def test_initial_state_freezes_the_extremes_of_each_row():
    scores = torch.randn(4, 20)
    state = init_layer_state(scores, 0.5, per_row=True, fix_frac_prune=0.4, fix_frac_keep=0.2, block_size=4,
                             tabu_frac=0.5)
    pruned, frozen = state.pruned.view(4, 20), state.frozen.view(4, 20)
    order = torch.argsort(scores, dim=1)
    for r in range(4):
        assert set(torch.nonzero(pruned[r]).flatten().tolist()) == set(order[r, :10].tolist())
        want_frozen = set(order[r, :4].tolist()) | set(order[r, -2:].tolist())
        assert set(torch.nonzero(frozen[r]).flatten().tolist()) == want_frozen
    assert state.tabu is not None and state.tabu.maxlen == round(0.5 * (80 - 24))
    assert init_layer_state(scores, 0.5, True, 0.4, 0.2, block_size=40, tabu_frac=0.5).tabu is None


def test_block_takes_top_pruned_and_bottom_kept_skipping_frozen_and_tabu():
    scores = torch.arange(12, dtype=torch.float32)
    pruned = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    frozen = torch.zeros(12, dtype=torch.bool)
    frozen[[5, 6]] = True
    tabu = torch.zeros(12, dtype=torch.bool)
    tabu[[4, 7]] = True
    idx, k = select_block(scores, pruned, frozen, tabu, block_size=5, k=2)
    assert k == 2 and idx.tolist() == [3, 2, 8, 9, 10]
    idx, k = select_block(scores, pruned, frozen, tabu, block_size=10, k=5)
    assert k == 5 and sorted(idx.tolist()) == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]


def test_per_sample_block_gradients_match_one_backward_per_sample():
    model = tiny_llama()
    batch = token_batches(1, batch_size=3)[0]
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    x, delta = capture_io_grads(model, module, causal_lm_sample_losses, batch)
    x2, delta2 = capture_io_grads(model, module, causal_lm_sample_losses, batch, micro_batch=2)  # chunks of 2 + 1
    torch.testing.assert_close((x2, delta2), (x, delta), rtol=1e-5, atol=1e-8)
    assert all(p.requires_grad for p in model.parameters())  # frozen only while capturing
    idx = torch.randperm(module.weight.numel(), generator=torch.Generator().manual_seed(0))[:40]
    G = per_sample_block_grads(x, delta, idx // module.weight.shape[1], idx % module.weight.shape[1], max_elems=300)
    per_sample = []
    for n in range(3):
        loss = causal_lm_sample_losses(model, {"input_ids": batch["input_ids"][n:n + 1]})[0]
        per_sample.append(torch.autograd.grad(loss, module.weight)[0])
    want = torch.stack([g.flatten()[idx] for g in per_sample])
    assert torch.allclose(G, want, rtol=1e-4, atol=1e-7)
    assert torch.allclose(mean_weight_grad(x, delta), torch.stack(per_sample).mean(0), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="one loss per sample"):
        capture_io_grads(model, module, lambda m, b: causal_lm_sample_losses(m, b).mean(), batch)


def test_split_batch_cuts_every_tensor_and_shares_the_rest():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5), "mode": "lm",
             "scale": torch.tensor(2.0)}
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])
    assert all(p["mode"] == "lm" and p["scale"] is batch["scale"] for p in parts)
    images, labels = split_batch((torch.zeros(3, 4), torch.arange(3)), 2)[1]
    assert images.shape == (1, 4) and labels.tolist() == [2]
    assert split_batch({"mode": "lm"}, 2) is None
    with pytest.raises(ValueError, match="different numbers of samples"):
        split_batch((torch.zeros(3), torch.zeros(5)), 2)
