"""Mask rules, magnitude and Wanda against computations written here independently."""
from __future__ import annotations

import pytest
import torch

from blocktrain.plugins.sparsity import magnitude_prune, wanda_prune
from blocktrain.trainer.compression.masks import apply_masks, find_linear_names, mask_from_scores, sparsity_report
from blocktrain.trainer.compression.replay import layer_groups

from .conftest import input_square_sums_by_hand, row_topk_mask_by_hand, tiny_llama, token_batches

DENSITY = 0.5


def test_layer_mask_keeps_the_largest_scores():
    scores = torch.randn(6, 10).abs()
    keep = mask_from_scores(scores, 0.3, "layer")
    threshold = sorted(scores.flatten().tolist(), reverse=True)[17]  # round(60 * 0.3) = 18 kept
    assert int(keep.sum()) == 18
    assert torch.equal(keep, scores >= threshold)


def test_row_mask_keeps_the_same_count_per_row():
    scores = torch.randn(5, 12)
    keep = mask_from_scores(scores, 0.25, "row")
    assert torch.equal(keep, row_topk_mask_by_hand(scores, 3))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_keeps_n_largest_of_every_m(n, m):
    scores = torch.randn(7, 4 * m)
    keep = mask_from_scores(scores, pattern=f"{n}:{m}")
    groups = keep.reshape(7, 4, m)
    assert (groups.sum(-1) == n).all() and ((~groups).sum(-1) == m - n).all()
    assert torch.equal(groups, row_topk_mask_by_hand(scores.reshape(-1, m), n).reshape(7, 4, m))


def test_bad_patterns_are_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_from_scores(torch.randn(3, 6), pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        mask_from_scores(torch.randn(3, 8), 0.5, "columns")


def test_targets_skip_lm_head_and_groups_follow_shared_inputs():
    model = tiny_llama()
    names = find_linear_names(model)
    assert len(names) == 14 and "lm_head" not in names
    groups, once = layer_groups(model, names, token_batches(1)[0])
    assert once
    assert [len(g) for g in groups] == [3, 1, 2, 1] * 2
    assert groups[0] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


@pytest.mark.parametrize("pattern", ["layer", "row", "2:4"])
def test_magnitude_prune_matches_hand_computation(pattern):
    model = tiny_llama()
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in find_linear_names(model)}
    masks = magnitude_prune(model, DENSITY, pattern=pattern)
    for name, w in originals.items():
        if pattern == "layer":
            want = mask_from_scores(w.abs(), DENSITY, "layer")
            threshold = torch.sort(w.abs().flatten(), descending=True).values[w.numel() // 2 - 1]
            assert torch.equal(want, w.abs() >= threshold)
        elif pattern == "row":
            want = row_topk_mask_by_hand(w.abs(), w.shape[1] // 2)
        else:
            want = row_topk_mask_by_hand(w.abs().reshape(-1, 4), 2).reshape(w.shape)
        assert torch.equal(masks[name], want), name
        assert torch.equal(model.get_submodule(name).weight, w * want)


def test_wanda_one_pass_matches_hand_computation():
    model, batches = tiny_llama(), token_batches(3)
    reference = tiny_llama()
    masks = wanda_prune(model, batches, density=DENSITY, pattern="row", sequential=False)
    for name in find_linear_names(reference):
        w = reference.get_submodule(name).weight.detach().double()
        scores = w.abs() * input_square_sums_by_hand(reference, name, batches).sqrt()
        assert torch.equal(masks[name], row_topk_mask_by_hand(scores, w.shape[1] // 2)), name


def test_sequential_wanda_sees_inputs_of_the_model_pruned_so_far():
    model, batches = tiny_llama(), token_batches(3)
    masks = wanda_prune(model, batches, density=DENSITY, pattern="row", sequential=True)
    reference = tiny_llama()
    for name in find_linear_names(reference):  # one layer at a time, in order, no shortcuts
        w = reference.get_submodule(name).weight
        scores = w.detach().double().abs() * input_square_sums_by_hand(reference, name, batches).sqrt()
        want = row_topk_mask_by_hand(scores, w.shape[1] // 2)
        assert torch.equal(masks[name], want), name
        apply_masks(reference, {name: want})
    one_pass = wanda_prune(tiny_llama(), batches, density=DENSITY, pattern="row", sequential=False)
    assert any(not torch.equal(masks[n], one_pass[n]) for n in masks)
    assert set(sparsity_report(model).values()) == {DENSITY}


def test_sequential_calibration_replays_blocks_and_matches_full_forwards(monkeypatch):
    """Block replay (one recording forward) gives the same pruned weights as one full forward per group."""
    from blocktrain.plugins.sparsity import sparsegpt_prune
    from blocktrain.trainer.compression import replay as calibration

    batches, calls = token_batches(3), []

    def counting(model, batch):
        calls.append(1)
        return model(**batch)

    replayed = tiny_llama()
    masks = sparsegpt_prune(replayed, batches, counting, density=DENSITY, pattern="layer")
    assert len(calls) == 1 + len(batches)  # the probe, then one recording pass
    monkeypatch.setattr(calibration, "_calibrate_by_block", lambda *args: False)
    calls.clear()
    full = tiny_llama()
    full_masks = sparsegpt_prune(full, batches, counting, density=DENSITY, pattern="layer")
    groups = layer_groups(tiny_llama(), find_linear_names(full), batches[0])[0]
    assert len(calls) == 1 + len(groups) * len(batches)
    for name in find_linear_names(full):
        assert torch.equal(masks[name], full_masks[name]), name
        torch.testing.assert_close(replayed.get_submodule(name).weight, full.get_submodule(name).weight,
                                   rtol=1e-5, atol=1e-6)
    assert replayed.config.use_cache  # restored after calibration


def test_block_replay_on_a_timm_vit_matches_full_forwards(monkeypatch):
    from blocktrain.trainer.compression import replay as calibration
    from blocktrain.trainer.testing import tiny_timm_vit

    images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calls = []

    def counting(model, batch):
        calls.append(1)
        return model(batch)

    replayed = wanda_prune(tiny_timm_vit(), images, counting, density=DENSITY, pattern="row", sequential=True)
    assert "head" in replayed and len(calls) == 1 + 2 * len(images)  # probe, recording pass, head's own pass
    monkeypatch.setattr(calibration, "_calibrate_by_block", lambda *args: False)
    full = wanda_prune(tiny_timm_vit(), images, density=DENSITY, pattern="row", sequential=True)
    assert replayed.keys() == full.keys() and all(torch.equal(replayed[n], full[n]) for n in full)


class ParallelBlocks(torch.nn.Module):
    """Blocks that all read the model's input (not a chain): block replay must not be used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                              torch.nn.Linear(16, 8)) for _ in range(2))

    def forward(self, x):
        return sum(block(x) for block in self.blocks)


def test_sequential_wanda_on_unchained_blocks_uses_full_forwards():
    model, reference = ParallelBlocks(), ParallelBlocks()
    batches = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    masks = wanda_prune(model, batches, density=DENSITY, pattern="row", sequential=True)
    for name in find_linear_names(reference):
        w = reference.get_submodule(name).weight
        scores = w.detach().double().abs() * input_square_sums_by_hand(reference, name, batches).sqrt()
        want = row_topk_mask_by_hand(scores, w.shape[1] // 2)
        assert torch.equal(masks[name], want), name
        apply_masks(reference, {name: want})


def test_wanda_nm_and_layer_patterns_are_exact():
    model = tiny_llama()
    masks = wanda_prune(model, token_batches(2), density=DENSITY, pattern="4:8")
    for name, keep in masks.items():
        assert (keep.reshape(keep.shape[0], -1, 8).sum(-1) == 4).all()
        assert int((model.get_submodule(name).weight != 0).sum()) == keep.numel() // 2
    model = tiny_llama()
    wanda_prune(model, token_batches(2), density=0.3, pattern="layer")
    report = sparsity_report(model)
    for name in report:
        numel = model.get_submodule(name).weight.numel()
        assert report[name] == round(numel * 0.3) / numel


def test_one_shot_batches_generator_is_rejected():
    model = tiny_llama()
    with pytest.raises(ValueError, match="re-iterable"):
        wanda_prune(model, (b for b in token_batches(2)), density=DENSITY)
