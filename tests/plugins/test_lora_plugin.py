"""The `lora` plugin: its config (YAML, dataclass, validation), and apply → export → init_from through a run."""
import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import blocktrain.conf
from blocktrain.plugins.lora import LoraConfig, LoraPlugin, lora_layers
from blocktrain.trainer.context import RunContext
from blocktrain.trainer.errors import UserError

YAML = Path(blocktrain.conf.__file__).parent / "plugin" / "lora.yaml"


def test_yaml_lists_the_dataclass_defaults():
    assert YAML.read_text().splitlines()[0] == "# @package plugin.lora"
    assert OmegaConf.to_container(OmegaConf.load(YAML)) == {"_plugin_": "lora", **dataclasses.asdict(LoraConfig())}


def test_config_module_imports_no_torch():
    code = ("import sys; from blocktrain.plugins.lora.plugin import LoraConfig, LoraPlugin; LoraConfig(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_config_composes_and_validates_through_the_engine():
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.registry import load_plugin_class
    from blocktrain.trainer.validation import validate_plugins

    assert load_plugin_class("lora") is LoraPlugin
    cfg = load_config(["plugin=[lora]", "plugin.lora.rank=4", "plugin.lora.alpha=1", "plugin.lora.scaling=sqrt_rank",
                       r'plugin.lora.targets=".*\.(query|value)"'])
    config = OmegaConf.to_object(validate_plugins(cfg.plugin)["lora"])
    assert config == LoraConfig(targets=r".*\.(query|value)", rank=4, alpha=1.0, scaling="sqrt_rank")
    listed = OmegaConf.to_object(validate_plugins(load_config(["plugin=[lora]", "plugin.lora.targets=[query]"]).plugin)["lora"])
    assert listed.targets == ["query"] and type(listed.targets) is list
    with pytest.raises(UserError, match="unknown LoRA scaling 'foo'"):
        validate_plugins(load_config(["plugin=[lora]", "plugin.lora.scaling=foo"]).plugin)


@pytest.mark.parametrize("change, message", [
    ({"scaling": "sqrt"}, "unknown LoRA scaling 'sqrt'. Valid values: rank, sqrt_rank"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"alpha": -1.0}, "alpha must be a positive number"),
    ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
    ({"targets": []}, "non-empty list of module names or a regex"),
    ({"targets": "(query"}, "not a valid regex"),
    ({"export": ["peft", "onnx"]}, "unknown plugin.lora.export format 'onnx'. Valid formats: adapter, peft, merged"),
])
def test_config_errors_are_clear(change, message):
    with pytest.raises(UserError, match=message):
        LoraConfig(**change)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=37, vocab_size=100, num_labels=3)).eval()


def test_plugin_apply_export_and_load_weights(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from blocktrain.trainer.testing import make_wordpiece_tokenizer

    base = tiny_bert()
    plugin = LoraPlugin(LoraConfig(targets=["query", "value"], rank=2, alpha=4, modules_to_save=["classifier"],
                                   export=["adapter", "peft", "merged"]))
    run = RunContext(cfg=None, run_dir=tmp_path, metrics=None, tokenizer=make_wordpiece_tokenizer())
    model = plugin.apply(copy.deepcopy(base), run)
    assert len(lora_layers(model)) == 4
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
        model.classifier.weight.add_(0.5)
    ids = torch.randint(0, 100, (2, 6))
    y = model(ids).logits
    out = tmp_path / "export" / "lora"
    written = set(plugin.export(model, out, run))
    assert {out / "adapter" / "lora_config.json", out / "peft" / "adapter_model.safetensors",
            out / "merged" / "config.json", out / "merged" / "tokenizer.json"} <= written
    assert all(p.is_file() for p in written)
    assert AutoTokenizer.from_pretrained(out / "merged")("good films")["input_ids"]
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, y, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), out / "peft").eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, y, rtol=1e-5, atol=1e-6)
    for path in (out / "adapter", out, tmp_path / "export"):  # as init_from may name it
        fresh = copy.deepcopy(base)
        assert plugin.load_weights(fresh, path)
        torch.testing.assert_close(fresh(ids).logits, y, rtol=0, atol=0)
    assert not plugin.load_weights(copy.deepcopy(base), tmp_path / "elsewhere")


def test_run_fit_export_then_init_from(lora_args, tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from blocktrain.trainer.checkpoint import load_weights
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.run import run

    args = [a for a in lora_args if not a.startswith("trainer.max_steps=")]
    run(load_config([*args, "logger=none", "trainer.max_steps=2", "stages=[fit,export]",
                     "trainer.enable_progress_bar=false", "plugin.lora.export=[adapter,merged]"]))
    export = tmp_path / "run" / "export"
    merged = AutoModelForSequenceClassification.from_pretrained(export / "lora" / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    ids = torch.randint(5, 60, (2, 9))
    assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)  # training changed something
    plugin = LoraPlugin(LoraConfig(targets=["query", "value"], modules_to_save=["classifier"]))
    model = plugin.apply(base, None)
    load_weights(model, export, [plugin])  # the engine's init_from path
    torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
