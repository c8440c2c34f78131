"""The adapter library's exports: PEFT adapter (loaded by PEFT itself), merged model (reloaded as the plain class),
our adapter; plain LoRA and Block-LoRA's tile_input variant."""
import copy
import json

import pytest
import torch

from blocktrain.plugins.blocklora import TileInputVariant
from blocktrain.trainer.adapters import (apply_lora, load_adapter, lora_layers, merge_lora, merged_state_dict,
                                         save_adapter, save_merged, save_peft_adapter)
from blocktrain.trainer.errors import UserError

from .builders import tiny_bert, tiny_llama, tiny_vit


def train_a_little(model, seed=1):
    """Stand-in for training: random non-zero B and a changed modules_to_save head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def adapted(build, **lora):
    base = build()
    model = apply_lora(copy.deepcopy(base), **lora)
    train_a_little(model)
    return base, model


@pytest.mark.parametrize("scaling", ["rank", "sqrt_rank"])
def test_peft_loads_our_adapter_sequence_classifier(tmp_path, scaling):
    from peft import PeftModel

    base, model = adapted(tiny_bert, targets=["query", "value"], rank=4, alpha=6, scaling=scaling,
                          modules_to_save=["classifier"])
    y = model(IDS).logits
    assert not torch.allclose(y, base(IDS).logits, atol=1e-3)
    save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is (scaling == "sqrt_rank") and config["task_type"] == "SEQ_CLS"
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids=IDS).logits, y, rtol=1e-5, atol=1e-6)


def test_peft_loads_our_adapter_causal_lm(tmp_path):
    from peft import PeftModel

    base, model = adapted(tiny_llama, targets=["q_proj", "v_proj", "down_proj"], rank=2, alpha=16)
    y = model(IDS).logits
    save_peft_adapter(model, tmp_path, base_model_name_or_path="local/tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "local/tiny-llama"
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids=IDS).logits, y, rtol=1e-5, atol=1e-6)


def test_peft_loads_our_adapter_on_timm(tmp_path):
    from peft import PeftModel

    base, model = adapted(tiny_vit, targets=r"blocks\.\d+\.attn\.qkv", rank=2, alpha=1, scaling="sqrt_rank",
                          modules_to_save=["head"])
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    save_peft_adapter(model, tmp_path)
    torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path).eval()(x), y, rtol=1e-5, atol=1e-6)


def test_block_lora_has_no_peft_format(tmp_path):
    _, model = adapted(tiny_vit, targets=["qkv"], rank=2, alpha=1, variant=TileInputVariant(8))
    with pytest.raises(UserError, match="n_blocks=8.*no PEFT format"):
        save_peft_adapter(model, tmp_path)


def test_merged_transformers_model_reloads_as_plain_class(tmp_path):
    from transformers import BertForSequenceClassification

    _, model = adapted(tiny_bert, targets=["query", "value", "intermediate.dense"], rank=4, alpha=8,
                       modules_to_save=["classifier"])
    y = model(IDS).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_merged(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    torch.testing.assert_close(reloaded(IDS).logits, y, rtol=1e-5, atol=1e-5)


def test_merged_causal_lm_reloads(tmp_path):
    from transformers import LlamaForCausalLM

    _, model = adapted(tiny_llama, targets=["q_proj", "o_proj", "gate_proj"], rank=2, alpha=4, scaling="sqrt_rank")
    y = model(IDS).logits
    save_merged(model, tmp_path)
    torch.testing.assert_close(LlamaForCausalLM.from_pretrained(tmp_path).eval()(IDS).logits, y,
                               rtol=1e-5, atol=1e-5)


def test_merged_timm_block_lora_reloads_with_timm(tmp_path):
    import timm

    _, model = adapted(tiny_vit, targets=["qkv", "fc1"], rank=2, alpha=1, variant=TileInputVariant(4),
                       modules_to_save=["head"])
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    save_merged(model, tmp_path)
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    torch.testing.assert_close(reloaded(x), y, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_of_merged_model_is_not_merged_twice():
    _, model = adapted(tiny_bert, targets=["query"], rank=2, alpha=2)
    unmerged = merged_state_dict(model)
    merge_lora(model)
    for k, v in merged_state_dict(model).items():
        torch.testing.assert_close(v, unmerged[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_blocks", [1, 4])
def test_our_adapter_round_trip(tmp_path, n_blocks):
    variant = TileInputVariant(n_blocks) if n_blocks > 1 else None
    base, model = adapted(tiny_vit, targets=["qkv", "proj"], rank=3, alpha=5, dropout=0.1, scaling="sqrt_rank",
                          variant=variant, modules_to_save="head|norm")  # top-level only
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "lora_config.json").read_text())
    assert config["n_blocks"] == n_blocks and config["modules_to_save"] == ["norm", "head"]
    if variant is None:
        fresh = load_adapter(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
        assert [layer.dropout for layer in lora_layers(fresh).values()] == [0.1] * 24
    else:  # the variant's plugin puts its layers on first (blocklora's load_block_adapter)
        with pytest.raises(UserError, match=r"n_blocks=4 \(a LoRA variant\): load it with the plugin"):
            load_adapter(copy.deepcopy(base), tmp_path)
    already = apply_lora(copy.deepcopy(base), targets=["qkv", "proj"], rank=3, alpha=5, scaling="sqrt_rank",
                         variant=variant, modules_to_save="head|norm")
    torch.testing.assert_close(load_adapter(already, tmp_path)(x), y, rtol=0, atol=0)


def test_adapter_into_a_different_lora_model_is_refused(tmp_path):
    base, model = adapted(tiny_bert, targets=["query", "value"], rank=4, alpha=8)
    save_adapter(model, tmp_path)
    other = apply_lora(copy.deepcopy(base), targets=["query"], rank=4, alpha=8)
    with pytest.raises(UserError, match="targets"):
        load_adapter(other, tmp_path)
    other = apply_lora(copy.deepcopy(base), targets=["query", "value"], rank=4, alpha=8, scaling="sqrt_rank")
    with pytest.raises(UserError, match="scaling"):
        load_adapter(other, tmp_path)
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing")
