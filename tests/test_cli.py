"""The `train` command: help and listing stay light, recipes compose, mistakes get one message."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from blocktrain.trainer.registry import builtin_recipes
from tests.helpers import train


def test_help_and_list_are_fast_and_import_no_torch():
    code = ("import sys, time; t=time.perf_counter(); from blocktrain.trainer.cli import main; "
            "main(['--help']); main(['--list']); dt=time.perf_counter()-t; "
            "heavy=[m for m in ('torch','pytorch_lightning','transformers') if m in sys.modules]; "
            "print('HEAVY', heavy, 'DT', dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "lora_text_classifier" in out and "lora" in out
    start = time.perf_counter()
    listing = train("--list")
    assert listing.returncode == 0 and "Recipes" in listing.stdout
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("recipe", sorted(builtin_recipes()))
def test_every_recipe_composes(recipe):
    result = train(f"recipe={recipe}", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "stages:" in result.stdout and "plugin:" in result.stdout


def test_user_recipe_file_composes(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("# @package _global_\n# my recipe\ndefaults:\n  - /recipe/lora_text_classifier\nseed: 7\n")
    result = train(f"recipe={own}", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "seed: 7" in result.stdout and "name: mine" in result.stdout


def _fails_with(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unknown_recipe_lists_valid_ones():
    _fails_with(train("recipe=nope"), "unknown recipe 'nope'", "lora_text_classifier")


def test_unknown_plugin_lists_valid_ones():
    _fails_with(train("recipe=lora_text_classifier", "plugin=[nope]", "data.train=x.csv"), "nope", "lora")


def test_unknown_key_lists_valid_keys():
    _fails_with(train("recipe=lora_text_classifier", "trainer.max_stepz=3", "data.train=x.csv"),
                "unknown config key 'trainer.max_stepz'", "max_steps")


def test_unknown_plugin_key_lists_valid_keys():
    _fails_with(train("recipe=lora_text_classifier", "+plugin.lora.rnak=3", "data.train=x.csv"),
                "unknown key 'rnak' in plugin.lora", "rank")


def test_wrong_type_is_rejected():
    _fails_with(train("recipe=lora_text_classifier", "plugin.lora.rank=abc", "data.train=x.csv"),
                "plugin.lora", "rank")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# @package _global_\nseed: [1, 2\n")
    _fails_with(train(f"recipe={bad}"), "malformed YAML", str(bad))


def test_missing_recipe_file(tmp_path):
    _fails_with(train(f"recipe={tmp_path}/absent.yaml"), "recipe file not found")


def test_missing_local_model_path(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,0\nb,1\n")
    _fails_with(train("recipe=lora_text_classifier", f"model.id={tmp_path}/no_such_model", f"data.train={data}",
                      f"run_dir={tmp_path}/run"), "no_such_model")


def test_unreachable_hub_id_names_it_and_shows_a_local_path(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,0\nb,1\n")
    _fails_with(train("recipe=lora_text_classifier", "model.id=someorg/not-a-model", f"data.train={data}",
                      f"run_dir={tmp_path}/run"), "'someorg/not-a-model'", "model.id=/path/to/dir")


def test_empty_data_directory(tiny_bert_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails_with(train("recipe=lora_text_classifier", f"model.id={tiny_bert_dir}", f"data.train={tmp_path}/empty",
                      f"run_dir={tmp_path}/run"), "empty data directory", str(tmp_path / "empty"))
    assert not (tmp_path / "run" / "metrics.json").exists()
