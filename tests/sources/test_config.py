"""Structured source configs: presets, and one clear UserError per kind of mistake."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.config import (DATA_KINDS, MODEL_KINDS, validate_data_config,
                                               validate_model_config)

CONF = Path(str(resources.files("blocktrain.conf")))
PRESETS = [("model", p) for p in sorted((CONF / "model").glob("*.yaml"))] + \
          [("data", p) for p in sorted((CONF / "data").glob("*.yaml"))]


def test_every_kind_has_a_preset():
    assert {p.stem for g, p in PRESETS if g == "model"} == set(MODEL_KINDS)
    assert {p.stem for g, p in PRESETS if g == "data"} == set(DATA_KINDS)


@pytest.mark.parametrize("group,path", PRESETS, ids=lambda x: getattr(x, "stem", x))
def test_preset_lists_every_key_with_the_dataclass_default(group, path):
    raw = OmegaConf.load(path)
    validate = validate_model_config if group == "model" else validate_data_config
    validated = validate(raw, allow_missing=True)
    schema = (MODEL_KINDS if group == "model" else DATA_KINDS)[raw.kind]
    defaults = OmegaConf.structured(schema)
    assert list(raw.keys()) == [f.name for f in dataclasses.fields(schema)]
    for key in raw:
        if OmegaConf.is_missing(defaults, key):
            assert OmegaConf.is_missing(raw, key), key
        else:
            assert raw[key] == defaults[key], key
            assert validated[key] == defaults[key], key
    if any(OmegaConf.is_missing(defaults, key) for key in raw):  # a value the user must give
        with pytest.raises(UserError, match="missing required value"):
            validate(raw)
    else:  # a source that needs nothing (the tiny CLIP demo)
        assert validate(raw) == validated


def test_validated_config_is_typed_and_strict():
    cfg = validate_model_config({"kind": "timm", "name": "resnet18", "num_classes": 3})
    assert cfg.pretrained is True and cfg.num_classes == 3 and cfg.checkpoint is None
    with pytest.raises(Exception):
        cfg.not_a_key = 1
    data = validate_data_config({"kind": "text_corpus", "files": ["a.txt"], "seq_len": 64, "batch_size": 2})
    assert data.files == ["a.txt"] and data.seq_len == 64 and data.stride is None and data.val_fraction == 0.05


def test_interpolations_resolve_against_the_whole_config():
    root = OmegaConf.create({"paths": {"data": "/data"}, "data": {"kind": "tensors", "path": "${paths.data}/t.pt"}})
    assert validate_data_config(root.data).path == "/data/t.pt"


def test_resolver_not_ready_yet_is_deferred():
    """``${data_info:num_labels}`` can only resolve once the data is loaded, after validation."""
    known = {}

    def later(key):
        if key not in known:
            raise UserError(f"{key} is not known yet")
        return known[key]

    OmegaConf.register_new_resolver("bt_test_later", later)
    try:
        root = OmegaConf.create({"model": {"kind": "transformers", "id": "x",
                                           "kwargs": {"num_labels": "${bt_test_later:num_labels}"}}})
        validated = validate_model_config(root.model)
        known["num_labels"] = 7
        assert validated.kwargs.num_labels == 7
        root.model.revision = "${no_such_key}"
        with pytest.raises(UserError, match="cannot resolve model.revision: Interpolation key 'no_such_key' not found"):
            validate_model_config(root.model)
    finally:
        OmegaConf.clear_resolver("bt_test_later")


@pytest.mark.parametrize("node,message", [
    ({"kind": "onnx", "id": "x"}, "unknown model.kind 'onnx'. Valid kinds: transformers, gguf, timm"),
    ({"id": "x"}, "model.kind is not set. Valid kinds: transformers, gguf, timm"),
    ({"kind": "timm", "name": "resnet18", "num_class": 3},
     "unknown key 'model.num_class' for model kind 'timm'. Valid keys: kind, name, pretrained, checkpoint, "
     "num_classes, drop_path_rate, kwargs"),
    ({"kind": "timm", "name": "resnet18", "pretrained": "yes"}, "model.pretrained must be true or false, got 'yes'"),
    ({"kind": "timm", "name": "resnet18", "num_classes": "ten"},
     "model.num_classes must be an integer or null, got 'ten'"),
    ({"kind": "transformers", "id": "x", "kwargs": [1]}, "model.kwargs must be a mapping, got [1]"),
    ({"kind": "transformers"}, "missing required value model.id"),
    ({"kind": "gguf", "id": "/x"}, "missing required value model.gguf_file"),
    ({"kind": "transformers", "id": "x", "dtype": "fp8"},
     "model.dtype must be one of float32, bfloat16, float16, auto, got 'fp8'"),
    ({"kind": "transformers", "id": "x", "processor": "feature"},
     "model.processor must be one of tokenizer, image_processor, processor, none, got 'feature'"),
])
def test_model_config_errors(node, message):
    with pytest.raises(UserError) as e:
        validate_model_config(node)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("node,message", [
    ({"kind": "parquet"}, "unknown data.kind 'parquet'. Valid kinds: text_classification, text_corpus, "
                          "torchvision, image_folder, tensors"),
    ({"kind": "tensors", "path": "t.pt", "x": "inputs"}, "unknown key 'data.x' for data kind 'tensors'. "
                                                         "Valid keys: kind, batch_size, eval_batch_size"),
    ({"kind": "text_corpus", "files": "a.txt"}, "data.files must be a list of strings, got 'a.txt'"),
    ({"kind": "image_folder", "path": "p", "mean": [0.5, "x"]}, "data.mean must be a list of numbers"),
    ({"kind": "tensors", "path": "p", "batch_size": 2.5}, "data.batch_size must be an integer, got 2.5"),
    ({"kind": "tensors", "path": "p", "batch_size": 0}, "data.batch_size must be a positive number, got 0"),
    ({"kind": "tensors", "path": "p", "val_fraction": 1.0}, "data.val_fraction must be a number in [0, 1), got 1.0"),
    ({"kind": "torchvision", "name": "MNIST", "channels": 2}, "data.channels must be one of null, 1, 3, got 2"),
    ({"kind": "text_classification"}, "missing required value data.train"),
])
def test_data_config_errors(node, message):
    with pytest.raises(UserError) as e:
        validate_data_config(node)
    assert str(e.value).startswith(message)


def test_config_module_imports_nothing_heavy():
    code = ("import sys, blocktrain.trainer.sources as s, blocktrain.trainer.sources.config; "
            "heavy = [m for m in ('torch', 'transformers', 'pytorch_lightning', 'timm') if m in sys.modules]; "
            "print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

