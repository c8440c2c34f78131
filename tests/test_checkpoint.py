"""``init_from`` reads weights only: a pickle that would run code is refused; our own files still load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from blocktrain.trainer.checkpoint import load_weights
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.run import build_plugins, run
from blocktrain.trainer.sources.models import load_model


class _OpensAFile:
    """Unpickling this calls ``open(path, "w")``: code run by merely loading the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_init_from_refuses_a_pickle_that_runs_code(tmp_path):
    model = torch.nn.Linear(3, 2)
    marker = tmp_path / "marker"
    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": model.state_dict(), "extra": _OpensAFile(marker)}, weights)
    with pytest.raises(UserError, match="holds more than weights: unpickling it would call io.open"):
        load_weights(torch.nn.Linear(3, 2), weights, [])
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def test_init_from_loads_a_plain_state_dict(tmp_path):
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    load_weights(target, tmp_path / "weights.pt", [])
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def test_init_from_loads_a_lightning_checkpoint_of_ours(lora_args, tmp_path):
    """Our .ckpt holds numpy RNG state beside the weights; init_from reads its weights without a full unpickle."""
    cfg = load_config([*lora_args, "logger=none", "stages=[fit]", "model.kwargs.num_labels=2"])
    run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert isinstance(saved["rng"]["numpy"][1], np.ndarray)
    plugins = build_plugins(cfg)
    model = load_model(cfg.model).model
    for plugin in plugins:
        model = plugin.apply(model, None) or model
    load_weights(model, ckpt, plugins)
    for name, value in model.state_dict().items():  # the trained adapter too, not the fresh one
        assert torch.equal(value, saved["state_dict"][f"model.{name}"]), name
