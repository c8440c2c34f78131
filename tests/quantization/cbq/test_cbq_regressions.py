"""Regressions from the broken first SmolLM2 run (perplexity 2.3M at W3A16 against RTN's 522): rank-5
LoRA-Rounding with V = A1·A2 alone hardened at its start to near-random rounding (half the codes off RTN). Now
V starts at AdaRound's V0 at any rank, so the hardened start is RTN and reconstruction can only improve on it;
CFP's activation scaling alone is the same function."""
from __future__ import annotations

import copy

import torch

from blocktrain.plugins.cbq.cbq import CBQSettings, cbq_quantize
from blocktrain.plugins.cbq.cfp import cfp_preprocess
from blocktrain.plugins.cbq.quantizer import CBQLinear
from blocktrain.plugins.cbq.settings import CFPSettings
from blocktrain.plugins.quantization import rtn_quantize
from blocktrain.trainer.compression.calibration import calibration_forward
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import QuantSpec, minmax_qparams, quantize
from tests.pruning.conftest import tiny_llama, token_batches


def _block_outputs(model, batches) -> list[list[torch.Tensor]]:
    """Per block, its hidden output on each batch (the model run whole)."""
    outs = [[] for _ in model.model.layers]
    handles = [block.register_forward_hook(lambda m, a, o, i=i: outs[i].append((o[0] if isinstance(o, tuple) else o)))
               for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches:
            calibration_forward(model, batch)
    for h in handles:
        h.remove()
    return outs


def _errors(model, reference, batches) -> list[float]:
    """Per block: Σ‖y − y_fp‖² / Σ‖y_fp‖² over the batches."""
    return [float(sum((y - r).pow(2).sum() for y, r in zip(ys, rs)) / sum(r.pow(2).sum() for r in rs))
            for ys, rs in zip(_block_outputs(model, batches), reference)]


def test_the_default_low_rank_start_hardens_to_round_to_nearest():
    """rank 5 < every width (32, 64), both inits, no steps: the codes are RTN's (but at exact x.5 ties)."""
    model = tiny_llama()
    names = find_linear_names(model, exclude=("lm_head",))
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    spec = QuantSpec(3)
    for init in ("svd", "zero"):
        entries = cbq_quantize(copy.deepcopy(model), token_batches(1), spec, names=names,
                               settings=CBQSettings(epochs=0, init=init, cfp=CFPSettings(enabled=False)))
        for name, w in weights.items():
            scale, zero = minmax_qparams(w, spec)
            t = w / scale
            tie = t - torch.floor(t) == 0.5
            assert torch.equal(entries[name]["codes"][~tie], quantize(w, scale, zero, spec)[~tie]), (init, name)


def test_after_cbq_no_block_reconstructs_its_calibration_outputs_worse_than_rtn():
    """Before the fixes (V = A1·A2 alone; the floor moving with the learned step) CBQ ended at about twice RTN's
    error here; a window's hardened result is never worse than its round-to-nearest start."""
    dense, batches = tiny_llama(), token_batches(2)
    names = find_linear_names(dense, exclude=("lm_head",))
    reference = _block_outputs(dense, batches)
    spec = QuantSpec(3)
    rtn = rtn_quantize(copy.deepcopy(dense), spec, names)
    cbq, logs = copy.deepcopy(dense), []
    cbq_quantize(cbq, batches, spec, settings=CBQSettings(epochs=5, cfp=CFPSettings(enabled=False)), names=names,
                 lr=1e-2, log=logs.append)
    rtn_err, cbq_err = _errors(rtn, reference, batches), _errors(cbq, reference, batches)
    assert all(c <= r * (1 + 1e-5) for c, r in zip(cbq_err, rtn_err)), (cbq_err, rtn_err)
    assert any(k.endswith("/kept_start") for row in logs for k in row)


def test_a_learned_step_rescales_the_grid_but_keeps_the_rounding_decisions():
    """V = V0, the step moved 7 % off its min-max start: the codes are still RTN's on the start grid (they used to
    be ⌊w/s⌋ at the new step plus V0's decisions, taken for the old one: a different, worse rounding)."""
    linear = torch.nn.Linear(48, 16)
    spec = QuantSpec(3)
    layer = CBQLinear(linear, spec, None, rank=2)
    with torch.no_grad():
        layer.log_gain.fill_(0.07)
    scale, zero = minmax_qparams(linear.weight, spec)
    t = linear.weight / scale
    tie = t - torch.floor(t) == 0.5
    rtn = quantize(linear.weight, scale, zero, spec)
    assert torch.equal(layer.codes()[~tie], rtn[~tie])
    layer.mode = "hard"
    with torch.no_grad():
        torch.testing.assert_close(layer.quantized_weight(), layer.scale() * (rtn - zero).float())


def test_cfp_activation_scaling_alone_leaves_the_model_unchanged():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[[3, 11]] = 50.0  # activation-outlier channels to scale
    batches = token_batches(2)
    with torch.no_grad():
        before = [model(**b).logits for b in batches]
    report, clips = cfp_preprocess(model, model.model.layers, find_linear_names(model, exclude=("lm_head",)),
                                   batches, calibration_forward, CFPSettings(clip_weights=False, scale_activations=True),
                                   QuantSpec(4))
    assert report["scaled_channels"] >= 2 and report["clipped_weights"] == 0 and clips == {}
    with torch.no_grad():
        for b, ref in zip(batches, before):
            torch.testing.assert_close(model(**b).logits, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


def test_cfp_weight_clipping_keeps_the_targets_and_never_starts_worse_than_rtn_at_fine_grids():
    """SmolLM2 at W6A6: CFP clipped every matrix's outlier weights in the model itself (perplexity 74 → 125 before
    any reconstruction, the targets clipped too). Now the clip is the quantizer's range, applied only where it
    lowers that weight's quantization error, and the full-precision targets keep the outliers."""
    dense, batches = tiny_llama(), token_batches(2)
    with torch.no_grad():
        dense.model.layers[0].mlp.down_proj.weight[4, 9] = 1.0  # a weight outlier (the rest |w| < 0.1)
    names = find_linear_names(dense, exclude=("lm_head",))
    reference = _block_outputs(dense, batches)
    spec = QuantSpec(6)
    rtn = rtn_quantize(copy.deepcopy(dense), spec, names)
    cbq, logs = copy.deepcopy(dense), []
    cbq_quantize(cbq, batches, spec, settings=CBQSettings(epochs=0), names=names, log=logs.append)
    assert any(row.get("cbq/cfp/unclipped_matrices", 0) >= 1 for row in logs)
    rtn_err, cbq_err = _errors(rtn, reference, batches), _errors(cbq, reference, batches)
    assert all(c <= r * (1 + 1e-3) for c, r in zip(cbq_err, rtn_err)), (cbq_err, rtn_err)
    forced = copy.deepcopy(dense)
    linear = forced.model.layers[0].mlp.down_proj
    layer = CBQLinear(linear, spec, None, rank=2, clip=0.1)
    x = torch.randn(3, linear.in_features)
    layer.mode = "fp"
    torch.testing.assert_close(layer(x), linear(x))  # the target keeps the outlier
    assert int(layer.codes()[4, 9]) == 2 ** 6 - 1  # the quantizer saturates it

