"""``cbq_quantize`` on a tiny real Llama: the result is QuantLinears on the grid, reconstruction beats the
round-to-nearest start, window 1 / overlap 0 is block-wise, pruned zeros stay zero, static activation steps
are learned, and a run resumed from a window's snapshot ends where the straight run ends."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blocktrain.plugins.cbq.cbq import CBQSettings, adam_learn, cbq_quantize, find_blocks
from blocktrain.plugins.cbq.quantizer import CBQLinear
from blocktrain.plugins.cbq.settings import CFPSettings
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import ActQuantSpec, QuantLinear, QuantSpec, dequantize, minmax_qparams, quantize
from tests.pruning.conftest import tiny_llama, token_batches

FAST = CBQSettings(epochs=1, cfp=CFPSettings(enabled=False))


def llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    if layers == 2:
        return tiny_llama(seed)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()


def flat(groups: list[dict]) -> list[torch.nn.Parameter]:
    return [p for group in groups for p in group["params"]]


def test_a_few_steps_give_quant_linears_on_the_grid():
    model, batches = llama(), token_batches(2)
    names = find_linear_names(model, exclude=("lm_head",))
    entries = cbq_quantize(model, batches, QuantSpec(4, False, 16), settings=CBQSettings(epochs=2))  # 4 steps
    assert sorted(entries) == sorted(names)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        assert layer.codes.dtype == torch.int32 and 0 <= int(layer.codes.min()) and int(layer.codes.max()) <= 15
        assert layer.scale.shape == (layer.out_features, layer.in_features // 16)
        assert torch.equal(layer.codes, entries[name]["codes"])
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_reconstruction_beats_the_round_to_nearest_start():
    """Full AdaRound V (rank 0). At rank 5 on this model 20 steps do not lower the hardened loss: the window keeps
    its start (test_cbq_regressions.py)."""
    logs = []
    cbq_quantize(llama(), token_batches(2), QuantSpec(3), settings=CBQSettings(epochs=20, rank=0), log=logs.append,
                 lr=3e-2)
    rec = {k.rsplit("/", 1)[1]: v for row in logs for k, v in row.items() if k.startswith("cbq/blocks_0-1/")}
    assert rec["rec_final"] < 0.9 * rec["rec_start"], rec


def test_rounding_lr_gives_the_rounding_parameters_their_own_rate():
    """Step sizes and rounding parameters are separate optimiser groups; with a vanishing ``rounding_lr`` the
    rounding stays where it started (the codes of a zero-step run) while the step sizes still learn, and with the
    shared rate the same steps move codes."""
    spec, groups = QuantSpec(3, False, 16), []

    def learn(params, loss_fn, batches, steps, name):
        groups.append([(len(g["params"]), g.get("lr")) for g in params])
        return adam_learn(params, loss_fn, batches, steps, name, lr=3e-2)

    def run(epochs: int, rounding_lr: float | None, learner=None) -> dict:
        settings = CBQSettings(epochs=epochs, rank=0, rounding_lr=rounding_lr, keep_better=False,
                               cfp=CFPSettings(enabled=False))
        return cbq_quantize(llama(), token_batches(2), spec, settings=settings, learn=learner, lr=3e-2)

    start, frozen, shared = run(0, None), run(4, 1e-12, learn), run(4, None)
    assert groups == [[(14, None), (14, 1e-12)]]  # one window: 14 step sizes at the shared lr, 14 V's at their own
    for name in start:
        assert torch.equal(frozen[name]["codes"], start[name]["codes"]), name
        assert not torch.equal(frozen[name]["scale"], start[name]["scale"]), name
    assert any(not torch.equal(shared[n]["codes"], start[n]["codes"]) for n in start)


def test_full_rank_start_is_round_to_nearest():
    """rank = full, svd init, no steps: the hardened codes are RTN's, but at exact x.5 ties (rounded up, not to even)."""
    model = llama()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in find_linear_names(model, exclude=("lm_head",))}
    spec = QuantSpec(4)
    entries = cbq_quantize(model, token_batches(1), spec, settings=CBQSettings(epochs=0, rank=64, cfp=CFPSettings(enabled=False)))
    for name, w in weights.items():
        scale, zero = minmax_qparams(w, spec)
        t = w / scale
        tie = t - torch.floor(t) == 0.5
        assert torch.equal(entries[name]["codes"][~tie], quantize(w, scale, zero, spec)[~tie]), name


def test_window_one_overlap_zero_is_block_wise_reconstruction():
    model = llama(layers=3)
    blocks = find_blocks(model, find_linear_names(model, exclude=("lm_head",)))[1]
    calls = []

    def learn(params, loss_fn, batches, steps, name):
        owners = {i for p in flat(params) for i, block in enumerate(blocks) for q in block.parameters() if q is p}
        calls.append((name, owners, steps))
        return adam_learn(params, loss_fn, batches, steps, name)

    snapshots = []
    cbq_quantize(model, token_batches(2), QuantSpec(4), settings=CBQSettings(window=1, overlap=0, epochs=1,
                                                                             cfp=CFPSettings(enabled=False)),
                 learn=learn, on_window=snapshots.append)
    assert calls == [(f"cbq/blocks_{b}-{b}", {b}, 2) for b in range(3)]  # each block alone, once
    assert [len(s["hardened"]) for s in snapshots] == [7, 14, 21] and all(not s["open"] for s in snapshots)


def test_two_block_windows_train_the_middle_block_twice():
    model = llama(layers=3)
    blocks = find_blocks(model, find_linear_names(model, exclude=("lm_head",)))[1]
    seen = []

    def learn(params, loss_fn, batches, steps, name):
        seen.append({i for p in flat(params) for i, block in enumerate(blocks) for q in block.parameters() if q is p})
        return adam_learn(params, loss_fn, batches, steps, name)

    snapshots = []
    cbq_quantize(model, token_batches(2), QuantSpec(4), settings=FAST, learn=learn, on_window=snapshots.append)
    assert seen == [{0, 1}, {1, 2}]
    assert len(snapshots[0]["hardened"]) == 7 and len(snapshots[0]["open"]) == 7  # block 1 carried into window 2


def test_resuming_from_a_window_snapshot_ends_where_the_straight_run_ends():
    spec, settings = QuantSpec(3, False, 16), CBQSettings(epochs=2, init="zero", cfp=CFPSettings(scale_activations=True))
    act = ActQuantSpec(8, dynamic=False)
    snapshots = []
    straight = cbq_quantize(llama(layers=3), token_batches(2), spec, act, settings, on_window=snapshots.append)
    model = llama(layers=3)
    resumed = cbq_quantize(model, token_batches(2), spec, act, settings, resume=snapshots[0])
    assert straight.keys() == resumed.keys()
    for name in straight:
        for key, value in straight[name].items():
            assert torch.equal(value, resumed[name][key]), (name, key)
    again = cbq_quantize(llama(layers=3), token_batches(2), spec, act, settings, resume=snapshots[-1])
    assert all(torch.equal(again[n]["codes"], straight[n]["codes"]) for n in straight)


def test_static_activation_steps_start_from_the_observed_range_and_are_learned():
    model = llama()
    entries = cbq_quantize(model, token_batches(2), QuantSpec(4), ActQuantSpec(8, dynamic=False), FAST, lr=1e-2)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.act.dynamic is False
    assert entries["model.layers.0.self_attn.q_proj"]["act_scale"].shape == (1, 1)
    assert float(layer.act_scale) > 0


def test_pruned_zeros_stay_exactly_zero():
    model = llama()
    names = find_linear_names(model, exclude=("lm_head",))
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            w.masked_fill_(w.abs() < w.abs().median(), 0)
    zeros = {n: model.get_submodule(n).weight == 0 for n in names}
    cbq_quantize(model, token_batches(2), QuantSpec(3), settings=CBQSettings(epochs=1, init="zero"), keep_zeros=True)
    for name in names:
        layer = model.get_submodule(name)
        assert torch.all(dequantize(layer.codes, layer.scale, layer.zero)[zeros[name]] == 0), name


def test_soft_mode_at_the_svd_start_is_the_weight_and_fp_mode_is_the_linear():
    linear = torch.nn.Linear(32, 8)
    layer = CBQLinear(linear, QuantSpec(8), None, rank=8)  # full rank: V = V0
    x = torch.randn(5, 32)
    layer.mode = "fp"
    assert torch.equal(layer(x), linear(x))
    with torch.no_grad():  # h(V0) = frac: ŵ = w but where the min-max range's rounded zero point clips (< half a step)
        err = (layer.quantized_weight() - linear.weight).abs()
    assert (err <= 0.5 * layer.scale() + 1e-6).all() and float((err < 1e-5).float().mean()) > 0.9


def test_a_model_without_a_block_stack_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no ModuleList of blocks"):
        cbq_quantize(model, [torch.randn(2, 4)], names=["0", "2"])
    with pytest.raises(ValueError, match="lie outside"):
        find_blocks(llama(), ["model.layers.0.mlp.up_proj", "lm_head"])
