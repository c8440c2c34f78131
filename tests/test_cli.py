"""The `train` command: help and listing stay light, recipes compose, mistakes get one message."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.registry import builtin_recipes
from tests.helpers import cli_env, train


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


def test_cfg_job_prints_values_left_for_the_user():
    result = train("recipe=lora_text_classifier", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "  train: ???" in result.stdout  # the data path a run must be given


@pytest.mark.parametrize("mistake, message", [
    ("plugin:\n  lora:\n    rnak: 3\n", "unknown key 'rnak' in plugin.lora. Valid keys: targets, rank"),
    ("data:\n  batch_size: many\n", "data.batch_size must be an integer, got 'many'"),
], ids=["wrong-key", "wrong-type"])
def test_cfg_job_validates_a_recipe_as_a_run_does(tmp_path, mistake, message):
    own = tmp_path / "mine.yaml"
    own.write_text("# @package _global_\ndefaults:\n  - /recipe/lora_text_classifier\n" + mistake)
    shown = train(f"recipe={own}", "--cfg", "job")
    _fails_with(shown, message)
    run = train(f"recipe={own}", f"data.train={own}", f"run_dir={tmp_path}/run")
    assert run.returncode == shown.returncode and run.stderr == shown.stderr


def test_cfg_job_validates_overrides():
    _fails_with(train("recipe=lora_text_classifier", "plugin.lora.rank=abc", "--cfg", "job"),
                "wrong type for plugin.lora.rank")


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


def test_missing_data_file_fails_before_the_hub_and_before_torch_loads():
    code = ("import sys, time; from blocktrain.trainer.cli import main; t = time.perf_counter()\n"
            "try:\n    main(['recipe=lora_text_classifier', 'model.id=someorg/not-a-model', 'data.train=/nope/train.csv'])\n"
            "except SystemExit as e:\n"
            "    print('EXIT', e.code, 'DT', time.perf_counter() - t, 'HEAVY', [m for m in ('torch', 'transformers') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "EXIT 2" in result.stdout and "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert float(result.stdout.split("DT")[1].split()[0]) < 3.0
    assert "data path not found: /nope/train.csv (data.train)" in result.stderr
    assert "hub" not in result.stderr and "not-a-model" not in result.stderr


def _touched(*args, **kwargs):
    raise AssertionError("a model source was loaded before the local paths were checked")


@pytest.mark.parametrize("recipe, override, message", [
    ("lora_text_classifier", "data.train=/nope/train.csv", "data path not found: /nope/train.csv (data.train)"),
    ("lora_text_classifier", "data.val=/nope/val.csv", "data path not found: /nope/val.csv (data.val)"),
    ("lora_text_classifier", "init_from=/nope/weights.pt", "init_from path not found: /nope/weights.pt"),
    ("lora_text_classifier", "resume=/nope/last.ckpt", "resume path not found: /nope/last.ckpt"),
    ("lora_text_classifier", "model.tokenizer=/nope/tokenizer", "model path not found: /nope/tokenizer"),
    ("wanda_vit", "data.path=/nope/images", "data path not found: /nope/images (data.path)"),
    ("wanda_vit", "model.checkpoint=/nope/vit.safetensors", "model path not found: /nope/vit.safetensors"),
    ("wanda_llm", "data.files=[/nope/*.txt]", "data path not found: /nope/*.txt (data.files)"),
])
def test_run_checks_local_paths_before_anything_loads(recipe, override, message, sentiment_csv, tmp_path,
                                                      monkeypatch):
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.run import run
    from blocktrain.trainer.sources import models

    monkeypatch.setattr(models, "load_processor", _touched)
    monkeypatch.setattr(models, "load_model", _touched)
    valid = {"lora_text_classifier": ["model.id=someorg/not-a-model", f"data.train={sentiment_csv[0]}"],
             "wanda_vit": [f"data.path={tmp_path}"], "wanda_llm": [f"data.files=[{sentiment_csv[0]}]"]}
    cfg = load_config([f"recipe={recipe}", *valid[recipe], override, f"run_dir={tmp_path}/run"])
    with pytest.raises(UserError, match=re.escape(message)):
        run(cfg)
    assert not (tmp_path / "run").exists()
