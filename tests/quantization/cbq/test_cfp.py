"""CFP: the coarse IQR fence and the fine split find planted outliers; weight clipping; the activation scales
folded into the norm and the consuming linears leave the full-precision model's function unchanged."""
from __future__ import annotations

import pytest
import torch

from blocktrain.plugins.cbq.cbq import CBQSettings, cbq_quantize
from blocktrain.plugins.cbq.cfp import (cfp_preprocess, channel_scales, clip_lowers_error, fold_scales,
                                         norm_linear_groups, outlier_mask, weight_clip)
from blocktrain.plugins.cbq.settings import CFPSettings
from blocktrain.trainer.compression.calibration import calibration_forward
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import ActQuantSpec, QuantSpec
from tests.pruning.conftest import tiny_llama, token_batches


@pytest.mark.parametrize("variant", ["paper", "msmodelslim"])
def test_outliers_are_the_planted_ones(variant):
    values = torch.rand(200, generator=torch.Generator().manual_seed(0)) + 1.0  # 1..2
    values[[7, 50, 120]] = torch.tensor([40.0, 41.0, 39.0])
    values[[3, 9]] = torch.tensor([3.2, 3.1])  # above the IQR fence (about 2.5), far below the outliers: candidates only
    mask = outlier_mask(values, CFPSettings(variant=variant))
    assert mask.nonzero().flatten().tolist() == [7, 50, 120]
    assert not outlier_mask(torch.rand(100, generator=torch.Generator().manual_seed(1)), CFPSettings()).any()


def test_the_fine_split_keeps_candidates_that_are_no_real_outliers():
    values = torch.linspace(0, 1, 100)
    values[0], values[1] = 1.9, 1.95  # above the fence (about 0.75 + 1.5 * 0.5), close to the bulk
    values[2] = 30.0
    mask = outlier_mask(values, CFPSettings())
    assert mask.nonzero().flatten().tolist() == [2]


def test_weight_outliers_are_clipped_to_the_largest_other_value_where_that_lowers_the_error():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)) * 0.02
    w[3, 4], w[10, 0] = 0.12, -0.15
    clip, n = weight_clip(w, CFPSettings())
    assert n == 2 and clip == pytest.approx(float(w.abs().flatten().sort().values[-3]))
    assert clip_lowers_error(w, clip, QuantSpec(2))  # coarse grid: the finer step pays for two saturated weights
    assert not clip_lowers_error(w, clip, QuantSpec(8))  # fine grid: saturating them costs more than it saves
    loud = torch.ones(32)
    loud[[4, 0]] = 1e3  # the outliers' input columns carry large activations: saturating them costs the output
    assert not clip_lowers_error(w, clip, QuantSpec(2), loud)
    assert weight_clip(torch.rand(16, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1, CFPSettings()) is None


def _llama_with_outlier_channels():
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[5, 17]] = 60.0  # two activation-outlier channels into q/k/v
            layer.post_attention_layernorm.weight[9] = -40.0  # and one (negative) into gate/up
    return model


def test_folded_scales_leave_the_full_precision_model_unchanged():
    model = _llama_with_outlier_channels()
    batches = token_batches(3)
    names = find_linear_names(model, exclude=("lm_head",))
    with torch.no_grad():
        before = [model(**b).logits for b in batches]
    groups = dict(norm_linear_groups(model, model.model.layers, batches[0], calibration_forward, names))
    assert groups["model.layers.0.input_layernorm"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert groups["model.layers.1.post_attention_layernorm"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert len(groups) == 4  # o_proj and down_proj read no norm's output
    settings = CFPSettings(clip_weights=False, scale_activations=True)
    scales = channel_scales(model, list(groups), batches, calibration_forward, settings)
    assert set(scales["model.layers.0.input_layernorm"].gt(1).nonzero().flatten().tolist()) == {5, 17}
    assert scales["model.layers.0.post_attention_layernorm"].gt(1).nonzero().flatten().tolist() == [9]
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    for norm, linears in groups.items():
        fold_scales(model, norm, linears, scales[norm])
    s = scales["model.layers.0.input_layernorm"]
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, q_before * s)
    with torch.no_grad():
        for b, ref in zip(batches, before):
            torch.testing.assert_close(model(**b).logits, ref, atol=1e-5, rtol=1e-5)
    seen = []
    handle = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, o: seen.append(o.abs().amax((0, 1))))
    with torch.no_grad():
        model(**batches[0])
    handle.remove()
    assert float(seen[0][[5, 17]].max()) < 0.5 * 60  # the outlier channels were scaled down


def test_cfp_preprocess_reports_what_it_did():
    model = _llama_with_outlier_channels()
    batches = token_batches(2)
    names = find_linear_names(model, exclude=("lm_head",))
    weights = {n: model.get_submodule(n).weight.clone() for n in names}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 7] = 0.1  # one weight outlier (the rest |w| < 0.07)
    report, clips = cfp_preprocess(model, model.model.layers, names, batches, calibration_forward,
                                   CFPSettings(scale_activations=True), QuantSpec(2))
    assert report["scaled_channels"] == 6 and report["clipped_weights"] >= 1
    assert "model.layers.1.mlp.down_proj" in clips and clips["model.layers.1.mlp.down_proj"] < 0.07
    assert float(model.model.layers[1].mlp.down_proj.weight[2, 7]) == pytest.approx(0.1)  # a quantizer range, not a model change
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, weights["model.layers.0.self_attn.o_proj"])


@pytest.mark.parametrize(("act", "scaled"), [(None, False), (ActQuantSpec(8), False), (ActQuantSpec(6), True),
                                             (ActQuantSpec(4), True)])
def test_cbq_scales_activations_by_default_only_below_8_bits(act, scaled):
    """``scale_activations: null`` folds the outlier channels' scales at A6/A4, not at A8 or weight-only; set, it wins."""
    for setting, expected in ((None, scaled), (True, True), (False, False)):
        counts = {}
        cbq_quantize(_llama_with_outlier_channels(), token_batches(1), QuantSpec(4), act,
                     CBQSettings(epochs=1, cfp=CFPSettings(scale_activations=setting)), log=counts.update)
        assert (counts["cbq/cfp/scaled_channels"] > 0) is expected, (setting, act)
