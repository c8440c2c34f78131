"""A new classifier head beside an adapter: kept trainable and exported (``modules_to_save``), and a run that
would leave it random and frozen refused, for every adapter plugin (``lora``, ``blocklora``)."""
import copy
import logging

import pytest
import torch
from safetensors.torch import load_file

from blocktrain.plugins.blocklora import BlockLoraConfig, BlockLoraPlugin, block_lora_layers
from blocktrain.plugins.lora import LoraConfig, LoraPlugin
from blocktrain.trainer.adapters import check_new_weights_trained, frozen_new_weights, modules_to_save
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.models import load_model

HEAD = ["classifier.bias", "classifier.weight"]
PLUGINS = {"lora": (LoraPlugin, LoraConfig, dict(targets=["query", "key", "value"], rank=2)),
           "blocklora": (BlockLoraPlugin, BlockLoraConfig, dict(targets=["query", "key", "value"], dropout=0.0))}


@pytest.fixture(scope="module")
def headless_bert_dir(tmp_path_factory):
    """A tiny BERT encoder without a classification head, as a sentence-transformer checkpoint is."""
    from blocktrain.trainer.testing import make_wordpiece_tokenizer, tiny_bert_classifier

    path = tmp_path_factory.mktemp("headless_bert")
    tokenizer = make_wordpiece_tokenizer()
    tiny_bert_classifier(len(tokenizer)).bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_classifier(path, seed, num_labels=3):
    torch.manual_seed(seed)  # the new head's random init
    return load_model({"kind": "transformers", "id": str(path), "auto_class": "AutoModelForSequenceClassification",
                       "kwargs": {"num_labels": num_labels}})


def plugin(name, **change):
    cls, config, settings = PLUGINS[name]
    return cls(config(**{**settings, **change}))


def fit_a_little(model, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    ids, labels = torch.randint(5, 100, (4, 7)), torch.tensor([0, 1, 2, 1])
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(ids).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_the_loader_reports_the_new_head(headless_bert_dir):
    loaded = load_classifier(headless_bert_dir, seed=0)
    assert loaded.info["new_weights"] == HEAD


def test_blocklora_trains_exports_and_reloads_modules_to_save(headless_bert_dir, tmp_path):
    loaded = load_classifier(headless_bert_dir, seed=0)
    blocklora = plugin("blocklora", modules_to_save=["classifier"])
    model = blocklora.apply(loaded.model, None)
    assert list(modules_to_save(model)) == ["classifier"] and len(block_lora_layers(model)) == 6
    assert frozen_new_weights(model, loaded.info["new_weights"]) == []
    check_new_weights_trained(model, loaded.info["new_weights"], [blocklora])  # nothing to refuse
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_a_little(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"classifier.weight", "classifier.bias"} <= changed
    assert changed == {n for n in before if ".lora_" in n or n.startswith("classifier.")}

    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    written = blocklora.export(model, tmp_path / "blocklora", None)
    adapter = load_file(str(tmp_path / "blocklora" / "adapter" / "lora_adapter.safetensors"))
    torch.testing.assert_close(adapter["classifier.weight"], model.classifier.weight, rtol=0, atol=0)
    assert tmp_path / "blocklora" / "merged" / "config.json" in written

    fresh = load_classifier(headless_bert_dir, seed=5).model  # another random head
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert blocklora.load_weights(fresh, tmp_path)  # the model gets the layers and the head
    assert list(modules_to_save(fresh)) == ["classifier"]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, want, rtol=0, atol=0)
    applied = blocklora.apply(load_classifier(headless_bert_dir, seed=6).model, None)  # as init_from does
    assert blocklora.load_weights(applied, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(applied.eval()(ids).logits, want, rtol=0, atol=0)
    without_head = plugin("blocklora").apply(load_classifier(headless_bert_dir, seed=5).model, None)
    with pytest.raises(UserError, match="modules_to_save is .'classifier'. in the adapter, .. in the model"):
        plugin("blocklora").load_weights(without_head, tmp_path)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_a_frozen_new_head_is_refused_naming_the_weights_and_the_fix(headless_bert_dir, name):
    loaded = load_classifier(headless_bert_dir, seed=0)
    adapter = plugin(name)
    model = adapter.apply(loaded.model, None)
    assert frozen_new_weights(model, loaded.info["new_weights"]) == HEAD
    with pytest.raises(UserError, match=rf"no plugin trains: classifier\.bias, classifier\.weight\. .* "
                                        rf"train them with plugin\.{name}\.modules_to_save=\[classifier\]$"):
        check_new_weights_trained(model, loaded.info["new_weights"], [adapter])


def test_with_init_from_a_frozen_new_head_is_a_warning(headless_bert_dir, caplog):
    loaded = load_classifier(headless_bert_dir, seed=0)
    adapter = plugin("lora")
    model = adapter.apply(loaded.model, None)
    with caplog.at_level(logging.WARNING, logger="blocktrain.trainer.adapters"):
        check_new_weights_trained(model, loaded.info["new_weights"], [adapter], init_from="/runs/a/export")
    assert "classifier.bias, classifier.weight" in caplog.text and "unless init_from=/runs/a/export" in caplog.text
    full = copy.deepcopy(load_classifier(headless_bert_dir, seed=0).model)  # no plugin: everything trains
    check_new_weights_trained(full, loaded.info["new_weights"], [])


def run_args(headless_bert_dir, sentiment_csv, run_dir, *extra):
    train_csv, val_csv = sentiment_csv
    return ["recipe=lora_text_classifier", "plugin=[blocklora]", "plugin.blocklora.targets=[query,key,value]",
            f"model.id={headless_bert_dir}", f"data.train={train_csv}", f"data.val={val_csv}", f"run_dir={run_dir}",
            "trainer=cpu", "logger=none", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            "data.batch_size=8", "scheduler.warmup_steps=0", *extra]


def test_the_issue_command_fails_without_and_runs_with_modules_to_save(headless_bert_dir, sentiment_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from blocktrain.trainer.checkpoint import load_weights
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.run import run

    with pytest.raises(UserError, match=r"plugin\.blocklora\.modules_to_save=\[classifier\]"):
        run(load_config(run_args(headless_bert_dir, sentiment_csv, tmp_path / "frozen")))
    run(load_config(run_args(headless_bert_dir, sentiment_csv, tmp_path / "run", "stages=[fit,export]",
                             "plugin.blocklora.modules_to_save=[classifier]")))
    export = tmp_path / "run" / "export" / "blocklora"
    adapter = load_file(str(export / "adapter" / "lora_adapter.safetensors"))
    merged = AutoModelForSequenceClassification.from_pretrained(export / "merged").eval()
    torch.testing.assert_close(merged.classifier.weight, adapter["classifier.weight"], rtol=0, atol=0)
    reloaded = BlockLoraPlugin(BlockLoraConfig(targets=["query", "key", "value"], modules_to_save=["classifier"]))
    model = reloaded.apply(load_classifier(headless_bert_dir, seed=9, num_labels=2).model, None)
    load_weights(model, tmp_path / "run" / "export", [reloaded])  # the engine's init_from path
    ids = torch.randint(5, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
