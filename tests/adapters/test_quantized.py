"""Adapters on a quantized base: ``model.quantization`` (bitsandbytes NF4/FP4/int8 through transformers), LoRA and
Block-LoRA over those layers and over our ``QuantLinear``, the PEFT export reloaded on the same quantized base,
refused merges, the plugin order (quantize, then adapt), and QLoRA from the CLI on a tiny Llama."""
import copy

import pytest
import torch
import torch.nn.functional as F

from blocktrain.plugins.blocklora import apply_block_lora
from blocktrain.trainer.adapters import (apply_lora, load_adapter, lora_layers, merge_lora, save_adapter, save_merged,
                                         save_peft_adapter)
from blocktrain.trainer.compression.quant import ActQuantSpec, QuantLinear, QuantSpec, minmax_qparams
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.config import validate_model_config

from ..helpers import train
from .builders import tiny_llama
from .test_export import train_a_little

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(llama_dir, quantization="nf4", **extra):
    from blocktrain.trainer.sources.models import load_model

    return load_model({"kind": "transformers", "id": str(llama_dir), "auto_class": "AutoModelForCausalLM",
                       "processor": "none", "quantization": quantization, **extra}).model


def ids(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))


def base_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model but the adapter's, under the base model's names."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# -- model.quantization ----------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"quantization": "nf5"}, "model.quantization must be one of none, nf4, fp4, int8"),
    ({"quantization": "int8", "quant_double": True}, "model.quant_double applies to 4-bit quantization"),
    ({"quant_compute_dtype": "bfloat16"}, "model.quant_compute_dtype applies to 4-bit .*quantization=none"),
    ({"quantization": "nf4", "quant_compute_dtype": "float64"}, "model.quant_compute_dtype must be one of"),
])
def test_quantization_settings_are_checked_at_config_time(change, message):
    with pytest.raises(UserError, match=message):
        validate_model_config({"kind": "transformers", "id": "x", **change})
    node = validate_model_config({"kind": "gguf", "id": "x", "gguf_file": "m.gguf", "quantization": "fp4",
                                  "quant_double": True, "quant_compute_dtype": "bfloat16"})
    assert (node.quantization, node.quant_double) == ("fp4", True)


def test_model_source_loads_the_linears_quantized(llama_dir):
    import bitsandbytes as bnb

    nf4 = load(llama_dir, "nf4")
    q = nf4.model.layers[0].self_attn.q_proj
    assert type(q) is bnb.nn.Linear4bit and q.weight.quant_type == "nf4" and q.weight.dtype == torch.uint8
    assert q.weight.quant_state.nested is False and q.compute_dtype == torch.float32
    assert type(nf4.lm_head) is torch.nn.Linear  # the output head stays unquantized, as transformers does
    fp4 = load(llama_dir, "fp4", quant_double=True, quant_compute_dtype="bfloat16")
    w = fp4.model.layers[1].mlp.down_proj.weight
    assert w.quant_type == "fp4" and w.quant_state.nested and fp4.model.layers[1].mlp.down_proj.compute_dtype == torch.bfloat16
    int8 = load(llama_dir, "int8").model.layers[0].mlp.up_proj
    assert type(int8) is bnb.nn.Linear8bitLt and int8.weight.dtype == torch.int8
    # the GGUF copy of the same model: dequantized, then quantized by bitsandbytes to the same codes and outputs
    gguf = load(llama_dir, "nf4", kind="gguf", gguf_file="tiny.gguf")
    assert torch.equal(gguf.model.layers[0].mlp.up_proj.weight, nf4.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(gguf(ids(nf4)).logits, nf4(ids(nf4)).logits, rtol=1e-5, atol=1e-5)


# -- LoRA over bitsandbytes layers -------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_lora_over_bnb_trains_the_adapter_only(llama_dir, quantization):
    model = load(llama_dir, quantization)
    before, x = base_state(model), ids(model)
    with torch.no_grad():
        reference = model(x).logits
    apply_lora(model, PROJECTIONS, rank=4, alpha=8, dropout=0.1)
    layers = lora_layers(model)
    assert len(layers) == 14 and {type(m.base_layer).__name__ for m in layers.values()} == \
        {"nf4": {"Linear4bit"}, "int8": {"Linear8bitLt"}}[quantization]
    assert all(m.lora_A.dtype == torch.float32 for m in layers.values())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)  # B = 0: the adapted model starts as the base
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 28
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()
    assert all(m.lora_B.abs().sum() > 0 for m in layers.values())
    after = base_state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, reference)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_peft_export_reloads_on_the_same_quantized_base(llama_dir, tmp_path, quantization):
    from peft import PeftModel

    model = apply_lora(load(llama_dir, quantization), ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    train_a_little(model)
    model.eval()
    x = ids(model)
    with torch.no_grad():
        want = model(x).logits
    save_peft_adapter(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "ours")
    peft = PeftModel.from_pretrained(load(llama_dir, quantization), tmp_path / "peft").eval()
    assert "bnb" in type(peft.base_model.model.model.layers[0].self_attn.q_proj).__module__  # PEFT's bnb layer
    ours = load_adapter(load(llama_dir, quantization), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours(x).logits, want)
        assert not torch.allclose(load(llama_dir, quantization)(x).logits, want)


def test_an_adapted_nf4_model_loads_its_own_full_state_back(llama_dir):
    """What resume does: the full state dict (4-bit codes and their quantization state included), strictly."""
    model = apply_lora(load(llama_dir, "nf4", quant_double=True), ["q_proj", "down_proj"], rank=2, alpha=2)
    train_a_little(model)
    state = model.state_dict()
    assert any(k.endswith("base_layer.weight.absmax") for k in state)
    again = apply_lora(load(llama_dir, "nf4", quant_double=True), ["q_proj", "down_proj"], rank=2, alpha=2)
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(again(ids(model)).logits, model(ids(model)).logits)
    other = apply_lora(load(llama_dir, "fp4", quant_double=True), ["q_proj", "down_proj"], rank=2, alpha=2)
    with pytest.raises(RuntimeError, match="4-bit quantization state differs from the base the model source loaded"):
        other.load_state_dict(state, strict=True)


def test_merge_on_a_quantized_base_is_refused(llama_dir, tmp_path):
    from blocktrain.plugins.blocklora.plugin import BlockLoraConfig, BlockLoraPlugin

    model = apply_lora(load(llama_dir, "nf4"), ["q_proj"], rank=2, alpha=2)
    for call in (merge_lora, lambda m: save_merged(m, tmp_path / "merged")):
        with pytest.raises(UserError, match=r"over a quantized base \(bitsandbytes nf4\) cannot be merged"):
            call(model)
    assert not (tmp_path / "merged").exists()
    plugin = BlockLoraPlugin(BlockLoraConfig(targets=["q_proj"], n_blocks=2))  # exports 'merged' by default
    with pytest.raises(UserError, match="plugin.blocklora.export has 'merged': LoRA over a quantized base"):
        plugin.apply(load(llama_dir, "nf4"), None)
    BlockLoraPlugin(BlockLoraConfig(targets=["q_proj"], n_blocks=2, export=["adapter"])).apply(load(llama_dir, "nf4"), None)


@pytest.mark.parametrize("mode, position", [("tile_input", "before_sum"), ("tile_input", "after_sum"),
                                            ("sum_rank", "before_sum")])
def test_block_lora_over_nf4_is_the_base_plus_its_update(llama_dir, mode, position):
    model = apply_block_lora(load(llama_dir, "nf4"), ["q_proj", "v_proj"], rank=4, n_blocks=2, dropout=0.25,
                             dropout_position=position, mode=mode)
    layer = model.model.layers[0].self_attn.q_proj
    train_a_little(model)
    codes = layer.base_layer.weight.clone()
    x = torch.randn(3, 5, layer.in_features)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + F.linear(x, layer.delta_weight()))
    layer.train()
    layer(x).square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert torch.equal(layer.base_layer.weight, codes) and not layer.base_layer.weight.requires_grad


# -- LoRA over QuantLinear ---------------------------------------------------------------------
def quantize_linears(model, names, spec, act=None):
    """Round-to-nearest each named Linear onto ``spec``'s grid as a ``QuantLinear`` (what a quantize plugin leaves)."""
    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        scale, zero = minmax_qparams(linear.weight, spec)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, QuantLinear.from_weight(linear.weight, scale, zero, spec, linear.bias, act=act))
    return model


@pytest.mark.parametrize("act", [None, ActQuantSpec(8)], ids=["W4A16", "W4A8"])
def test_lora_over_quantlinear_trains_the_adapter_over_fixed_codes(act):
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    quantize_linears(model, names, QuantSpec(4, group_size=16), act)
    before = base_state(model)
    apply_lora(model, ["q_proj", "v_proj", "up_proj"], rank=4, alpha=4)
    layer = model.model.layers[1].mlp.up_proj
    assert type(layer).__name__ == "QuantLinearLora" and "QuantLinear 4-bit" in repr(layer)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        assert layer.lora_B.grad.abs().sum() > 0
        optimizer.step()
    assert layer.lora_A.grad.abs().sum() > 0  # flows once B is non-zero
    after = base_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    h = torch.randn(4, layer.in_features)
    with torch.no_grad():  # the base sees its (fake-quantized) input, the adapter the input as it is
        torch.testing.assert_close(layer.eval()(h), layer.base_layer(h) + F.linear(h, layer.delta_weight()))
    with pytest.raises(UserError, match=r"QuantLinear 4-bit\) cannot be merged"):
        merge_lora(model)


# -- plugin order ------------------------------------------------------------------------------
def test_adapters_follow_a_quantize_plugin_and_never_precede_one():
    from blocktrain.plugins.lora.plugin import LoraConfig, LoraPlugin
    from blocktrain.trainer.plugin import Plugin, PluginConfig
    from blocktrain.trainer.validation import check_combination

    class Rtn(Plugin):
        name, kind = "rtn", "quantize"

    rtn, lora = Rtn(PluginConfig()), LoraPlugin(LoraConfig())
    check_combination(lora, [rtn], [])
    lora.check_pipeline([rtn])
    with pytest.raises(UserError, match=r"plugin rtn \(quantize\) cannot come after plugin lora \(adapter\).*"
                                        r"plugin=\[rtn,lora\]"):
        check_combination(lora, [], [rtn])
    merged = LoraPlugin(LoraConfig(export=["peft", "merged"]))
    with pytest.raises(UserError, match=r"plugin.lora.export has 'merged', but rtn leaves the base weights quantized"):
        merged.check_pipeline([rtn])


# -- QLoRA from the CLI --------------------------------------------------------------------------
@pytest.mark.slow
def test_qlora_recipe_trains_and_exports_a_peft_adapter_for_the_nf4_base(llama_dir, corpus, tmp_path):
    from peft import PeftModel

    run_dir = tmp_path / "run"
    result = train("recipe=qlora_llm", f"model.id={llama_dir}", f"data.files=[{corpus}]", "data.seq_len=16",
                   "data.batch_size=4", "data.val_fraction=0.2", "trainer=cpu", "logger=none",
                   "trainer.enable_progress_bar=false", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "plugin.lora.rank=4", "optim.lr=1e-2", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items()}
    fresh = load(llama_dir, "nf4", quant_double=True)
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    assert len(lora) == 28 and all(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_B"))
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
    want = fresh.state_dict()
    assert base.keys() == want.keys() and all(torch.equal(base[k], want[k]) for k in want)  # still the NF4 base

    export = run_dir / "export" / "lora"
    peft = PeftModel.from_pretrained(fresh, export / "peft").eval()
    ours = load_adapter(load(llama_dir, "nf4", quant_double=True), export / "adapter").eval()
    for name, layer in lora_layers(ours).items():
        assert torch.equal(layer.lora_B, lora[f"{name}.lora_B"])
    x = ids(ours)
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
