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


def test_the_replay_service_probes_producers_and_captures_block_inputs():
    """``probe_layers`` tells which norm each Linear reads (none for o_proj/down_proj); ``capture_inputs`` stops
    each forward at the block and returns what a full forward hands it."""
    from blocktrain.trainer.compression.masks import find_linear_names
    from blocktrain.trainer.compression.replay import capture_inputs, probe_layers
    from tests.pruning.conftest import tiny_llama, token_batches

    model, batches = tiny_llama(), token_batches(2)
    names = find_linear_names(model)
    norms = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    probe = probe_layers(model, names, batches[0], lambda m, b: m(**b), producers=norms)
    assert probe.once and [len(g) for g in probe.groups] == [3, 1, 2, 1] * 2
    assert probe.read_from == {f"model.layers.{i}.{n}": f"model.layers.{i}.{norm}" for i in range(2)
                               for norm, ns in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj")),
                                                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
                               for n in ns}
    seen, after = [], []
    model.model.layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    model.model.layers[1].register_forward_hook(lambda m, args, out: after.append(1))
    captured = capture_inputs(model, model.model.layers[1], batches, lambda m, b: m(**b), storage="cpu")
    assert len(captured) == 2 and not after  # stopped at the block: it never ran
    for (args, kwargs), x in zip(captured, seen):
        assert torch.equal(args[0], x) and "position_embeddings" in kwargs
