"""The iCBS pruner on a tiny Llama: initial mask, per-step invariants, dL, and resume."""
from __future__ import annotations

import pytest
import torch

from blocktrain.kernels.qubo_anneal import qubo_anneal
from blocktrain.plugins.icbs import ICBSConfig, ICBSPruner, icbs_prune
from blocktrain.plugins.sparsity import wanda_prune
from blocktrain.trainer.compression.masks import find_linear_names, row_keep_count, sparsity_report
from blocktrain.trainer.tasks.language import causal_lm_sample_losses

from .conftest import input_square_sums_by_hand, row_topk_mask_by_hand, tiny_llama, token_batches

FAST = dict(block_size=16, k=8, restarts=2, beta_factor=1.6, steps_per_epoch=8, min_steps=0)


def test_zero_steps_is_the_wanda_per_output_mask():
    batches = token_batches(3)
    model = tiny_llama()
    pruner = icbs_prune(model, batches, causal_lm_sample_losses, density=0.5, epochs=0, **FAST)
    assert pruner.steps_done == 0 and pruner.dL_track == [] and set(pruner.layer_steps.values()) == {0}
    wanda = wanda_prune(tiny_llama(), batches, density=0.5, pattern="row", sequential=False)
    reference = tiny_llama()
    for name, keep in pruner.masks().items():
        assert torch.equal(keep, wanda[name]), name
        w = reference.get_submodule(name).weight.detach()
        scores = w.double().abs() * input_square_sums_by_hand(reference, name, batches).sqrt()
        assert torch.equal(keep, row_topk_mask_by_hand(scores, row_keep_count(*w.shape, 0.5))), name
        assert torch.equal(model.get_submodule(name).weight, w * keep)


def test_every_step_keeps_densities_originals_and_frozen_weights():
    model, batches = tiny_llama(), token_batches(4)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in find_linear_names(model)}
    pruner = ICBSPruner(model, causal_lm_sample_losses, config=ICBSConfig(density=0.4, **FAST))
    pruner.initialize(batches)
    counts = {n: int(s.pruned.sum()) for n, s in pruner.layers.items()}
    frozen = {n: (s.frozen.clone(), s.pruned[s.frozen].clone()) for n, s in pruner.layers.items()}
    init_masks = pruner.masks()
    assert any(s.tabu is not None for s in pruner.layers.values())
    for step in range(12):
        pruner.step(batches[step % 4])
        for name, keep in pruner.masks().items():
            w = model.get_submodule(name).weight
            assert int((~keep).sum()) == counts[name]
            assert torch.equal(w[keep], originals[name][keep]) and (w[~keep] == 0).all()
            assert torch.equal(pruner.layers[name].pruned[frozen[name][0]], frozen[name][1])
    assert len(pruner.dL_track) == 12 and pruner.epoch == 2
    assert any(not torch.equal(init_masks[n], keep) for n, keep in pruner.masks().items())


def test_dL_is_never_positive_without_the_faithful_cutoff():
    model, batches = tiny_llama(), token_batches(4)
    pruner = icbs_prune(model, batches, causal_lm_sample_losses, density=0.5, faithful=False, **FAST)
    dL = torch.tensor(pruner.dL_track)
    assert len(dL) == 8 and (dL <= 1e-6 * dL.abs().max()).all() and dL.mean() < 0
    assert pruner.layer_steps == {n: pruner.state_dict()["plan"].count(n) for n in pruner.names}  # one epoch: its plan


@pytest.mark.parametrize("faithful,scale", [(True, 2.0), (False, 1.0)])
def test_faithful_anneals_at_the_official_temperature(faithful, scale, monkeypatch):
    from blocktrain.plugins.icbs import pruner as pruner_module

    scales = []

    def spy(*args, **kwargs):
        scales.append(kwargs["beta_scale"])
        return qubo_anneal(*args, **kwargs)

    monkeypatch.setattr(pruner_module, "qubo_anneal", spy)
    icbs_prune(tiny_llama(), token_batches(2), causal_lm_sample_losses, density=0.5, faithful=faithful,
               **{**FAST, "steps_per_epoch": 2})
    assert scales == [scale, scale]


def test_interrupted_run_resumes_to_the_same_masks():
    batches = token_batches(4)
    full = icbs_prune(tiny_llama(), batches, causal_lm_sample_losses, density=0.5, epochs=2, **FAST)

    saved = {}

    def interrupt(pruner, dL):
        if pruner.steps_done == 5:
            saved.update(pruner.state_dict())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        icbs_prune(tiny_llama(), batches, causal_lm_sample_losses, density=0.5, epochs=2, on_step=interrupt, **FAST)
    model = tiny_llama()
    resumed = ICBSPruner(model, causal_lm_sample_losses, config=ICBSConfig(density=0.5, **FAST))
    resumed.load_state_dict(saved)
    assert resumed.steps_done == 5 and resumed.remaining == 3
    resumed.run(batches, epochs=2)
    assert resumed.steps_done == full.steps_done == 16
    assert resumed.dL_track == full.dL_track
    assert resumed.layer_steps == full.layer_steps and sum(full.layer_steps.values()) == 16
    for name, keep in full.masks().items():
        assert torch.equal(resumed.masks()[name], keep), name
        assert torch.equal(model.get_submodule(name).weight, full.model.get_submodule(name).weight)
        assert resumed.layers[name].tabu is None or resumed.layers[name].tabu.items() == full.layers[name].tabu.items()


def test_resume_needs_the_original_weights():
    batches = token_batches(2)
    pruner = icbs_prune(tiny_llama(), batches, causal_lm_sample_losses, density=0.5, epochs=0, **FAST)
    with pytest.raises(ValueError, match="original"):
        ICBSPruner(pruner.model, causal_lm_sample_losses, config=pruner.config).load_state_dict(pruner.state_dict())


def test_config_overrides_derive_k_from_the_block_size():
    assert ICBSConfig().block_k == 2048
    pruner = ICBSPruner(tiny_llama(), causal_lm_sample_losses, config=ICBSConfig(), block_size=16)
    assert pruner.config.block_k == 8
    with pytest.raises(ValueError, match="k must be"):
        ICBSConfig(block_size=16, k=17)


def test_magnitude_init_needs_no_calibration_data():
    model = tiny_llama()
    pruner = ICBSPruner(model, causal_lm_sample_losses, init="magnitude", density=0.3, **FAST)
    pruner.initialize()
    for name, density in sparsity_report(model).items():
        numel = model.get_submodule(name).weight.numel()
        assert density == round(numel * 0.3) / numel
    with pytest.raises(ValueError, match="calibration"):
        ICBSPruner(tiny_llama(), causal_lm_sample_losses, **FAST).initialize()
