"""The `blocklora` plugin: config (YAML, dataclass, validation); apply → export → init_from on a tiny CLIPModel."""
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import blocktrain.conf
from blocktrain.plugins.blocklora import BlockLoraConfig, BlockLoraPlugin, block_lora_layers, count_parameters
from blocktrain.trainer.context import RunContext
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.validation import PLUGIN_MARKER
from tests.plugins.test_blocklora_clip import clip_inputs, randomize, tiny_clip

YAML = Path(blocktrain.conf.__file__).parent / "plugin" / "blocklora.yaml"
RECIPE_KEYS = ["rank", "n_blocks", "alpha", "scaling", "dropout", "dropout_position", "mode", "targets", "encoder",
               "layers", "modules_to_save", "export"]


def test_yaml_lists_the_dataclass_defaults():
    assert YAML.read_text().splitlines()[0] == "# @package plugin.blocklora"
    assert OmegaConf.to_container(OmegaConf.load(YAML)) == {PLUGIN_MARKER: "blocklora",
                                                            **dataclasses.asdict(BlockLoraConfig())}
    assert [f.name for f in dataclasses.fields(BlockLoraConfig)] == RECIPE_KEYS  # the keys the recipes use


def test_config_module_imports_no_torch():
    code = ("import sys; from blocktrain.plugins.blocklora.plugin import BlockLoraConfig, BlockLoraPlugin; "
            "BlockLoraConfig(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_config_composes_and_validates_through_the_engine():
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.registry import load_plugin_class
    from blocktrain.trainer.validation import validate_plugins

    assert load_plugin_class("blocklora") is BlockLoraPlugin
    cfg = load_config(["plugin=[blocklora]", "plugin.blocklora.mode=sum_rank", "plugin.blocklora.rank=8",
                       "plugin.blocklora.layers=[0,6]", "plugin.blocklora.encoder=vision",
                       "plugin.blocklora.targets=[q_proj,k_proj,v_proj,out_proj]"])
    config = OmegaConf.to_object(validate_plugins(cfg.plugin)["blocklora"])
    assert config == BlockLoraConfig(mode="sum_rank", rank=8, layers=[0, 6], encoder="vision",
                                     targets=["q_proj", "k_proj", "v_proj", "out_proj"])
    default = OmegaConf.to_object(validate_plugins(load_config(["plugin=[blocklora]"]).plugin)["blocklora"])
    assert BlockLoraPlugin(default).config == BlockLoraConfig() and type(default.targets) is list
    assert BlockLoraPlugin({"rank": 4, "layers": (0, 6)}).config == BlockLoraConfig(rank=4, layers=[0, 6])
    with pytest.raises(UserError, match="n_blocks must divide rank: rank=2, n_blocks=8"):
        validate_plugins(load_config(["plugin=[blocklora]", "plugin.blocklora.mode=sum_rank"]).plugin)
    with pytest.raises(UserError, match="plugin lora cannot be combined with blocklora \\(another adapter plugin\\)"):
        validate_plugins(load_config(["plugin=[lora,blocklora]"]).plugin)
    with pytest.raises(UserError, match="wrong type for plugin.blocklora.n_blocks"):
        validate_plugins(load_config(["plugin=[blocklora]", "plugin.blocklora.n_blocks=eight"]).plugin)


@pytest.mark.parametrize("change, message", [
    ({"scaling": "sqrt"}, "unknown LoRA scaling 'sqrt'. Valid values: rank, sqrt_rank"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"n_blocks": 0}, "n_blocks must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ({"mode": "blocks"}, "unknown Block-LoRA mode 'blocks'. Valid values: tile_input, sum_rank"),
    ({"mode": "sum_rank", "rank": 8, "dropout_position": "after_sum"}, "use before_sum"),
    ({"dropout_position": "before"}, "unknown Block-LoRA dropout_position 'before'"),
    ({"encoder": "image"}, "unknown Block-LoRA encoder 'image'. Valid values: vision, text, both"),
    ({"layers": [6]}, r"layers must be null \(all layers\) or \[start, end\)"),
    ({"layers": [6, 6]}, r"0 <= start < end, got \[6, 6\]"),
    ({"targets": []}, "plugin.blocklora.targets must be a non-empty list"),
    ({"targets": "(q_proj"}, "not a valid regex"),
    ({"export": ["adapter", "peft"]}, "unknown plugin.blocklora.export format 'peft'. Valid formats: adapter, merged"),
])
def test_config_errors_are_clear(change, message):
    with pytest.raises(UserError, match=message):
        BlockLoraConfig(**change)


@pytest.mark.parametrize("settings", [
    dict(),  # the spec's defaults: Reading A, r = 2, n = 8, dropout before the chunk-sum
    dict(mode="sum_rank", rank=4, n_blocks=2, scaling="rank", targets=["q_proj", "v_proj", "out_proj"]),
    dict(dropout_position="after_sum", encoder="vision", layers=[1, 3]),
])
def test_plugin_apply_export_and_load_weights(tmp_path, settings):
    from transformers import CLIPModel

    base = tiny_clip()
    plugin = BlockLoraPlugin(BlockLoraConfig(**settings))
    run = RunContext(cfg=None, run_dir=tmp_path, metrics=None)
    model = plugin.apply(copy.deepcopy(base), run)
    layers = block_lora_layers(model)
    assert {layer.variant.mode for layer in layers.values()} == {plugin.config.mode}
    assert count_parameters(model)[0] == sum(l.lora_A.numel() + l.lora_B.numel() for l in layers.values())
    randomize(layers)
    inputs = clip_inputs()
    y = model(**inputs).logits_per_image
    assert not torch.allclose(y, base(**inputs).logits_per_image, atol=1e-4)

    out = tmp_path / "export" / "blocklora"
    written = set(plugin.export(model, out, run))
    assert {out / "adapter" / "blocklora_config.json", out / "adapter" / "lora_adapter.safetensors",
            out / "merged" / "config.json"} <= written and all(p.is_file() for p in written)
    saved = json.loads((out / "adapter" / "blocklora_config.json").read_text())
    assert (saved["mode"], saved["dropout_position"]) == (plugin.config.mode, plugin.config.dropout_position)

    merged = CLIPModel.from_pretrained(out / "merged").eval()
    assert not block_lora_layers(merged)
    torch.testing.assert_close(merged(**inputs).logits_per_image, y, rtol=1e-5, atol=1e-5)
    for path in (out / "adapter", out, tmp_path / "export"):  # as init_from may name it
        fresh = copy.deepcopy(base)
        assert plugin.load_weights(fresh, path)
        assert sorted(block_lora_layers(fresh)) == sorted(layers)
        torch.testing.assert_close(fresh(**inputs).logits_per_image, y, rtol=0, atol=0)
    applied = plugin.apply(copy.deepcopy(base), run)  # the engine applies plugins, then loads init_from
    assert plugin.load_weights(applied, out)
    torch.testing.assert_close(applied(**inputs).logits_per_image, y, rtol=0, atol=0)
    assert not plugin.load_weights(copy.deepcopy(base), tmp_path / "elsewhere")


def test_adapter_of_another_mode_or_shape_is_refused(tmp_path):
    from blocktrain.trainer.checkpoint import load_weights

    reading_a = BlockLoraPlugin(BlockLoraConfig(rank=8, n_blocks=8, export=["adapter"]))
    model = reading_a.apply(tiny_clip(), None)
    reading_a.export(model, tmp_path / "blocklora", None)
    reading_b = BlockLoraPlugin(BlockLoraConfig(rank=8, n_blocks=8, mode="sum_rank"))
    with pytest.raises(UserError, match="is Block-LoRA mode tile_input, the model's layers are mode sum_rank"):
        load_weights(reading_b.apply(tiny_clip(), None), tmp_path, [reading_b])
    other_rank = BlockLoraPlugin(BlockLoraConfig(rank=4, n_blocks=8))
    with pytest.raises(UserError, match="rank is 8 in the adapter, 4 in the model"):
        load_weights(other_rank.apply(tiny_clip(), None), tmp_path, [other_rank])


def test_a_training_step_moves_only_the_adapters():
    model = BlockLoraPlugin(BlockLoraConfig()).apply(tiny_clip(), None).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits = model(**clip_inputs()).logits_per_image
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if ".lora_" in n}
    assert any(n.startswith("vision_model") for n in changed) and any(n.startswith("text_model") for n in changed)
