"""Calibration samples: N distinct train-split items by seed (text windows or images), batched; configs torch-free."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from blocktrain.trainer.compression.calibration import calibration_batches, model_inputs
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.data import build_datasets


def test_text_windows_are_distinct_train_windows_drawn_by_seed(llama_dir, corpus):
    data = build_datasets({"kind": "text_corpus", "files": [str(corpus)], "seq_len": 16, "val_fraction": 0.2},
                          tokenizer=AutoTokenizer.from_pretrained(llama_dir))
    batches = calibration_batches(data, 10, 4, seed=5)
    assert [b["input_ids"].shape for b in batches] == [(4, 16), (4, 16), (2, 16)]
    drawn = [tuple(w.tolist()) for b in batches for w in b["input_ids"]]
    train = [tuple(data.train[i]["input_ids"].tolist()) for i in range(len(data.train))]
    assert len(set(drawn)) == 10 and all(w in train for w in drawn)
    again = calibration_batches(data, 10, 4, seed=5)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = calibration_batches(data, 10, 4, seed=6)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    assert set(model_inputs(batches[0])) == {"input_ids"}
    with pytest.raises(UserError, match=rf"plugin.x.calibration.samples=1000 but the train split has only {len(train)}"):
        calibration_batches(data, 1000, 4, seed=0, where="plugin.x.calibration")


def test_images_come_with_their_labels(images):
    data = build_datasets({"kind": "image_folder", "path": str(images), "image_size": 32, "val_fraction": 0.25,
                           "batch_size": 4})
    batches = calibration_batches(data, 6, 4, seed=0)
    assert [b[0].shape for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert [b[1].shape for b in batches] == [(4,), (2,)] and torch.equal(model_inputs(batches[0]), batches[0][0])


def test_pruning_configs_import_no_torch():
    code = ("import sys; from blocktrain.plugins.sparsity.plugin import WandaConfig, SparseGPTConfig, MagnitudeConfig; "
            "from blocktrain.plugins.icbs.plugin import ICBSPluginConfig; WandaConfig(); ICBSPluginConfig(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
