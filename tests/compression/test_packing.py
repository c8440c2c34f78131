"""Exports of QuantLinear models: compressed-tensors (reloaded by transformers) and dequantized."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from blocktrain.kernels import use_backend
from blocktrain.trainer.compression.packing import (PackedLinear, export_quantized, pack_model, read_compressed,
                                                    save_compressed, save_dequantized)
from blocktrain.trainer.compression.quant import ActQuantSpec, QuantLinear, QuantSpec, minmax_qparams

pytest.importorskip("compressed_tensors")

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny_llama(tied: bool = False) -> LlamaForCausalLM:
    """One Llama block, widths 64 and 128 so that groups of 32 and 64 divide every input."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def quantized(spec, act: ActQuantSpec | None = None, density: float = 1.0, lm_head: bool = False,
              tied: bool = False) -> LlamaForCausalLM:
    """The tiny model with every block Linear (and ``lm_head`` if asked) replaced by a min/max QuantLinear on ``spec``
    (a QuantSpec, or a function of the layer name); with ``density`` < 1 the smallest weights of each are zeroed
    first (a pruned model)."""
    spec_of = spec if callable(spec) else lambda name: spec
    model = tiny_llama(tied)
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, torch.nn.Linear) or (name == "lm_head" and not lm_head):
            continue
        w = linear.weight.detach().clone()
        if density < 1:
            w[w.abs() < w.abs().flatten().kthvalue(int((1 - density) * w.numel())).values] = 0
        kw = {}
        if act is not None:
            kw["act"] = act
            if not act.dynamic:
                kw.update(act_scale=torch.tensor(0.05), act_zero=torch.tensor(0.0 if act.symmetric else 2 ** (act.bits - 1)))
        parent, _, child = name.rpartition(".")
        grid = spec_of(name)
        setattr(model.get_submodule(parent) if parent else model, child,
                QuantLinear.from_weight(w, *minmax_qparams(w, grid), grid, linear.bias, **kw))
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def ct_config(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("bits,symmetric,group", [(4, False, None), (4, True, None), (4, False, 32), (4, True, 64),
                                                  (8, False, None), (8, True, 32), (2, False, 64), (3, True, 32)])
def test_packed_reload_is_bit_exact(tmp_path, bits, symmetric, group):
    model = quantized(QuantSpec(bits, symmetric, group))
    save_compressed(model, tmp_path)
    config = ct_config(tmp_path)
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["group_size"]) == (bits, symmetric, group)
    assert weights["strategy"] == ("channel" if group is None else "group")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("symmetric", [False, True])
def test_tied_embeddings_survive_both_exports(tmp_path, symmetric):
    """SmolLM2 ties lm_head to the embedding: the blocks are quantized, the tie stays."""
    model = quantized(QuantSpec(4, symmetric, 32), tied=True)
    for path in (save_compressed(model, tmp_path / "ct"), save_dequantized(model, tmp_path / "dq")):
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert torch.equal(logits(reloaded), logits(model))
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_mixed_settings_get_one_config_group_each(tmp_path):
    model = quantized(lambda name: QuantSpec(8, True) if ".mlp." in name else QuantSpec(4, True, 32))
    save_compressed(model, tmp_path)
    groups = ct_config(tmp_path)["config_groups"].values()
    assert sorted(g["weights"]["num_bits"] for g in groups) == [4, 8]
    mlp = next(g for g in groups if g["weights"]["num_bits"] == 8)["targets"]
    assert sorted(mlp) == [f"model.layers.0.mlp.{p}_proj" for p in ("down", "gate", "up")]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


@pytest.mark.parametrize("act,exact", [(ActQuantSpec(8, False, dynamic=True), True),
                                       (ActQuantSpec(8, False, dynamic=False), True),
                                       (ActQuantSpec(4, True, dynamic=False), True),
                                       (ActQuantSpec(8, True, dynamic=True), False)])
def test_activation_settings_reload(tmp_path, act, exact):
    """Activation fake-quant is simulated by compressed-tensors on reload: exactly ours, except dynamic symmetric
    per-token, whose scale is absmax/((2^b − 1)/2) there and absmax/(2^(b−1) − 1) here."""
    model = quantized(QuantSpec(4, True, 32), act)
    save_compressed(model, tmp_path)
    config = ct_config(tmp_path)
    inputs = config["config_groups"]["group_0"]["input_activations"]
    assert config["format"] == "int-quantized"
    assert (inputs["num_bits"], inputs["symmetric"], inputs["dynamic"]) == (act.bits, act.symmetric, act.dynamic)
    assert inputs["strategy"] == ("token" if act.dynamic else "tensor")
    got, want = logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(model)
    weight_only = logits(quantized(QuantSpec(4, True, 32)))
    assert not torch.allclose(got, weight_only, atol=1e-4), "the reloaded model does not quantize its inputs"
    if exact:
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_dequantized_export_reloads_as_plain_linears(tmp_path):
    model = quantized(QuantSpec(4, False, 32))
    save_dequantized(model, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("symmetric", [False, True])
def test_pruned_weights_stay_exactly_zero(tmp_path, symmetric):
    model = quantized(QuantSpec(4, symmetric, 32), density=0.5)
    paths = export_quantized(model, tmp_path)
    for path in (paths["compressed-tensors"], paths["dequantized"]):
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        logits(reloaded)  # compressed-tensors decompresses on the first forward
        for name, q in model.named_modules():
            if isinstance(q, QuantLinear):
                kept_zero = q.weight == 0
                assert kept_zero.float().mean() > 0.45  # the pruned half (minus ties at the threshold)
                assert (reloaded.get_submodule(name).weight[kept_zero] == 0).all(), (path, name)


def test_export_report(tmp_path):
    model = quantized(QuantSpec(4, False, 32))
    paths = export_quantized(model, tmp_path)
    assert set(paths) == {"compressed-tensors", "dequantized", "native", "report"}
    report = json.loads(paths["report"].read_text())
    assert report["code_bits_per_weight"] == 4
    assert report["bits_per_weight"] == pytest.approx(4 + (32 + 4) / 32)  # fp32 scale + 4-bit zero per 32 weights
    assert len(report["layers"]) == 7
    sizes = {fmt: report["formats"][fmt]["size_bytes"] for fmt in ("compressed-tensors", "dequantized")}
    assert 0 < sizes["compressed-tensors"] < sizes["dequantized"]


@pytest.mark.parametrize("bits,symmetric,group", [(4, False, 32), (3, False, None), (2, True, 64)])
def test_read_compressed_returns_the_quant_linears_exactly(bits, symmetric, group, tmp_path):
    """A compressed-tensors folder read back into QuantLinear entries: the same grid, codes, scales and zeros."""
    spec = QuantSpec(bits, symmetric, group)
    model = quantized(spec)
    save_compressed(model, tmp_path)
    entries, read_spec = read_compressed(tmp_path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert read_spec == spec and set(entries) == set(layers)
    for name, q in layers.items():
        for part in ("codes", "scale", "zero"):
            assert torch.equal(entries[name][part], getattr(q, part)), (name, part)


def test_read_compressed_refuses_activation_quantized_checkpoints(tmp_path):
    save_compressed(quantized(QuantSpec(4, False, None), act=ActQuantSpec(8, False, True)), tmp_path)
    with pytest.raises(ValueError, match="expected one weight-only pack-quantized config group"):
        read_compressed(tmp_path)


@pytest.mark.parametrize("bits,symmetric,group", [(4, False, 32), (2, True, None)])
def test_packed_inference_path_equals_the_quant_linears(bits, symmetric, group):
    model = quantized(QuantSpec(bits, symmetric, group))
    want = logits(model)
    pack_model(model)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is PackedLinear and up.packed.dtype == torch.int32
    assert torch.equal(logits(model), want)  # fp32: the reference path
    assert (up.cpu_packed() is not None) == (bits == 4)  # W4 g32: ready for torch's int4 kernel (bf16 inputs)


def test_packed_linear_reconverts_its_cpu_layout_when_its_buffers_change():
    model = pack_model(quantized(QuantSpec(4, False, 32)))
    up = model.model.layers[0].mlp.up_proj
    first = up.cpu_packed()
    assert up.cpu_packed() is first  # converted once
    other = pack_model(quantized(QuantSpec(4, True, 32)))
    up.load_state_dict(other.model.layers[0].mlp.up_proj.state_dict())
    x = torch.randn(3, up.in_features).bfloat16()
    assert up.cpu_packed() is not first
    with use_backend("reference"):
        want = up(x)
    torch.testing.assert_close(up(x), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_unsupported_settings_fail_clearly(tmp_path):
    for save in (save_compressed, save_dequantized):
        with pytest.raises(ValueError, match="tied to the input embedding"):
            save(quantized(QuantSpec(4), lm_head=True, tied=True), tmp_path)
    with pytest.raises(ValueError, match="asymmetric weight-only layers mixed"):
        save_compressed(quantized(lambda name: QuantSpec(8, True) if ".mlp." in name else QuantSpec(4)), tmp_path)
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_compressed(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="unknown export format"):
        export_quantized(quantized(QuantSpec(4)), tmp_path, formats=("gguf",))
    with pytest.raises(ValueError, match="weight-only"):
        pack_model(quantized(QuantSpec(4), ActQuantSpec(8)))


def test_a_ragged_last_group_is_refused_by_the_compressed_tensors_export_and_reader(tmp_path):
    """compressed-tensors cannot hold a group size that does not divide a width: our writer refuses it with one
    message, a checkpoint made by hand with one loads in transformers but fails at its first forward, and
    ``read_compressed`` refuses it rather than guess its layout."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file

    ragged = QuantSpec(4, True, 48, ragged=True)  # widths 64 = 48 + 16 and 128 = 2·48 + 32
    with pytest.raises(ValueError, match=r"7 layer\(s\) have a narrower last group \(e.g. model.layers.0.self_attn."
                                         r"q_proj: 64 inputs, groups of 48\), which the compressed-tensors format"):
        save_compressed(quantized(ragged), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    folder = save_compressed(quantized(QuantSpec(4, True, 32)), tmp_path / "hand")  # then rewritten with groups of 48
    state = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for f in folder.glob("*.safetensors"):
        f.unlink()
    for name, q in ((n, m) for n, m in quantized(ragged).named_modules() if isinstance(m, QuantLinear)):
        state[f"{name}.weight_packed"] = pack_to_int32(q.codes.to(torch.int8), 4)
        state[f"{name}.weight_scale"] = q.scale.to(state[f"{name}.weight_scale"].dtype)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    next(iter(config["quantization_config"]["config_groups"].values()))["weights"]["group_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="must be divisble by the given group_size 48"), torch.no_grad():
        loaded(IDS)
    with pytest.raises(ValueError, match=r"down_proj has 128 inputs, which groups of 48 do not divide: compressed"):
        read_compressed(folder)
