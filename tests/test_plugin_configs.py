"""Every built-in plugin: its YAML lists its dataclass defaults, validates, and rejects wrong types."""
from __future__ import annotations

import dataclasses
from importlib import resources

import pytest
from omegaconf import OmegaConf

from blocktrain.plugins import BUILTIN
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.registry import load_plugin_class
from blocktrain.trainer.validation import PLUGIN_MARKER, validate_plugins

PLUGIN_DIR = resources.files("blocktrain.conf").joinpath("plugin")
NAMES = sorted(n for n in BUILTIN if PLUGIN_DIR.joinpath(f"{n}.yaml").is_file())


def test_every_builtin_plugin_has_a_config():
    assert NAMES == sorted(BUILTIN)


@pytest.mark.parametrize("name", NAMES)
def test_plugin_yaml_equals_dataclass_defaults_and_validates(name):
    text = PLUGIN_DIR.joinpath(f"{name}.yaml").read_text()
    assert text.splitlines()[0] == f"# @package plugin.{name}"
    cls = load_plugin_class(name)
    assert OmegaConf.to_container(OmegaConf.create(text)) == {PLUGIN_MARKER: name,
                                                                **dataclasses.asdict(cls.config_class())}
    validated = validate_plugins(load_config([f"plugin=[{name}]"]).plugin)
    assert list(validated) == [name]


@pytest.mark.parametrize("name", NAMES)
def test_plugin_config_rejects_a_wrong_type(name):
    numeric = (int, float, "int", "float")
    fields = [f for f in dataclasses.fields(load_plugin_class(name).config_class) if f.type in numeric]
    assert fields, f"{name} has no numeric field to mistype"
    with pytest.raises(UserError, match=fields[0].name):
        validate_plugins(load_config([f"plugin=[{name}]", f"plugin.{name}.{fields[0].name}=abc"]).plugin)


def test_plugins_left_by_a_recipe_but_not_selected_are_ignored(capsys):
    cfg = load_config(["recipe=lora_text_classifier", "plugin=[]"])
    assert "lora" in cfg.plugin and validate_plugins(cfg.plugin) == {}
    assert "not in the plugin list" in capsys.readouterr().err
