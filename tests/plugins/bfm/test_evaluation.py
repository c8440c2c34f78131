"""Evaluation helpers of the generative plugins: the sample classifier (trained once and cached, or a TorchScript
file), the class accuracy logged by the evaluate stage, and the content-keyed cache of alignment targets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.generative import classifier as clf
from blocktrain.trainer.generative.encoders import TokenCache
from blocktrain.trainer.run import run
from blocktrain.trainer.sources.data import build_datasets
from tests.helpers import read_metrics
from tests.plugins.bfm.test_core import tiny_bfm
from tests.plugins.bfm.tiny import tiny_args, write_tiny_idx


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    return write_tiny_idx(tmp_path_factory.mktemp("fashion"), n_train=200, n_val=40)


def test_small_cnn_learns_the_classes_and_is_cached_once(idx_root, tmp_path, monkeypatch):
    data = build_datasets({"kind": "idx_images", "root": str(idx_root), "batch_size": 8})
    net = clf.load_classifier("train", data.train, 1, 10, str(tmp_path), {"data": "tiny"}, epochs=15)
    assert clf.class_accuracy(net, *data.val.tensors) >= 0.9  # the bar position is learnable
    assert net.features(data.val.tensors[0][:3]).shape == (3, 128)
    assert len(list(tmp_path.glob("classifier_*.pt"))) == 1

    def no_training(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(clf, "train_small_cnn", no_training)
    again = clf.load_classifier("train", data.train, 1, 10, str(tmp_path), {"data": "tiny"}, epochs=15)
    x = data.val.tensors[0]
    assert torch.equal(again(x), net(x))
    with pytest.raises(AssertionError, match="retrained"):  # another dataset key is another classifier
        clf.load_classifier("train", data.train, 1, 10, str(tmp_path), {"data": "other"}, epochs=15)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.pt"))
    assert torch.equal(clf.load_classifier(str(tmp_path / "net.pt"), None, 1, 10, "", {})(x), net(x))  # TorchScript
    with pytest.raises(UserError, match="classifier file not found"):
        clf.load_classifier(str(tmp_path / "missing.pt"), None, 1, 10, "", {})


class AlwaysZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 10).index_fill_(1, torch.tensor([0]), 1.0)


def test_evaluate_logs_sample_and_real_accuracy_against_their_labels(idx_root, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is not installed")
    path = tmp_path / "zero.pt"
    torch.jit.save(torch.jit.script(AlwaysZero()), str(path))
    p = "plugin.flow_matching"
    cfg = load_config(["recipe=fm_fashion", *tiny_args("flow_matching", idx_root, tmp_path / "cache"), "logger=csv",
                       "stages=[fit,evaluate]", "trainer.max_steps=1", f"{p}.eval.num_samples=20",
                       f"{p}.eval.num_real=15", f"{p}.eval.classifier={path}", f"run_dir={tmp_path / 'run'}"])
    run(cfg)
    v = read_metrics(tmp_path / "run")["metrics"]
    # a classifier that always says class 0: right on the 2 of 20 balanced samples and 2 of the 15 val images of class 0
    assert v["acc/steps4"] == pytest.approx(0.1) and v["acc/real"] == pytest.approx(2 / 15)
    assert v["fd/steps4"] > 0 and "kid/steps4" in v


def test_token_cache_computes_each_image_once_and_is_exact(tmp_path):
    calls = []

    def compute(images):
        calls.append(len(images))
        return images.flatten(1)[:, :6].view(-1, 2, 3) * 2

    cache = TokenCache(compute)
    x = torch.randn(5, 1, 4, 4)
    first = cache(x)
    assert torch.equal(first, compute(x)) and calls[0] == 5 and len(cache) == 5
    calls.clear()
    mixed = torch.cat([x[[3, 1]], x[:1] + 1e-3])  # two hits, one changed (augmented) image
    out = cache(mixed)
    assert calls == [1] and torch.equal(out, compute(mixed)) and len(cache) == 6
    cache.save(tmp_path / "t.pt")
    loaded = TokenCache(lambda images: pytest.fail("recomputed a saved image"))
    loaded.load(tmp_path / "t.pt")
    assert torch.equal(loaded(x[[4, 0]]), first[[4, 0]])


def test_bfm_align_cache_gives_the_same_loss_as_the_encoder():
    from types import SimpleNamespace

    from blocktrain.plugins.bfm.plugin import BFMConfig, BFMPlugin
    from blocktrain.trainer.generative.config import SamplerConfig

    losses = []
    for cached in (False, True):
        plugin = BFMPlugin(BFMConfig(align_cache=cached, sampler=SamplerConfig(steps=4)))
        torch.manual_seed(0)  # a stand-in frozen encoder: 16x16 -> an 8x8 map of 16 features
        plugin.encoder = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, 16, 1)).requires_grad_(False)
        model = tiny_bfm(segments=2, image_size=16)
        plugin.targets = plugin.encoder_tokens(model.grid)
        images = torch.randn(6, 1, 16, 16)
        for _ in range(2):  # the second pass reads the cache
            torch.manual_seed(1)
            terms = plugin.loss(model, (images, torch.arange(6) % 5), SimpleNamespace())
            losses.append(float(terms["align"]))
        assert isinstance(plugin.targets, TokenCache) == cached
    assert losses[0] == losses[1] == losses[2] == losses[3]
