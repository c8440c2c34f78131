"""The h4g plugin: its operator's contraction, the three arms, alignment lowering InfoNCE, zero-shot evaluation
that never sees target labels, config errors, and the h4g_synthetic recipe end to end from the CLI (fit,
evaluate, export) with the export reloaded by the predict path."""
from __future__ import annotations

import json

import pytest
import torch

from blocktrain.kernels.poincare import radius
from blocktrain.plugins.h4g import H4GConfig, H4GModel, MobiusBlockScaling, load_exported, predict
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.graph.config import TagZeroShotTaskConfig
from blocktrain.trainer.graph.synthetic import synthetic_tags
from blocktrain.trainer.graph.task import TagZeroShotTask, featurize
from blocktrain.trainer.sources.data import build_datasets
from tests.graph.conftest import tiny_bert  # noqa: F401  (fixture)
from tests.helpers import read_metrics, train

TINY = {"hidden": 16, "groups": 4}


def _model(tiny_bert, **kw):
    from transformers import AutoModel, AutoTokenizer

    cfg = H4GConfig(**{**TINY, **kw})
    return H4GModel(AutoModel.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert), **cfg.model_kwargs())


def _data(**kw):
    return build_datasets({"kind": "graph", "batch_size": 16, "synthetic_nodes": 64, "synthetic_vocab": 600,
                           "target_homophily": [0.1, 0.9], **kw})


class _Run:
    def __init__(self, data):
        self.data = data

    def log(self, values, step=None):
        pass


@pytest.mark.parametrize("form", ["full", "scalar"])
def test_operator_starts_contractive_and_halves_the_radius(form):
    op = MobiusBlockScaling(16, 4, c=1.0, init=0.5, form=form).double()
    x = torch.randn(10, 16, dtype=torch.float64) * 0.1
    assert torch.allclose(radius(op(x)), 0.5 * radius(x), atol=1e-10)
    assert op.weight.numel() == (4 * 4 * 4 if form == "full" else 4)


def test_arms(tiny_bert):
    feats = torch.randn(5, 32)
    data = type("D", (), {"x": feats, "edge_index": torch.tensor([[0, 1], [1, 0]])})
    for geometry, similarity in [("h4g", "distance"), ("h4g", "tangent"), ("hyperbolic", "distance"),
                                 ("euclidean", "distance")]:
        model = _model(tiny_bert, geometry=geometry, similarity=similarity)
        g, t = model.embed_nodes(data), model.embed_texts(feats[:3])
        logits = model.logits(g, t)
        assert logits.shape == (5, 3) and torch.isfinite(logits).all()
        assert (model.scaling is not None) == (geometry == "h4g")
        if geometry == "euclidean":
            assert torch.allclose(g.norm(dim=-1), torch.ones(5))
        else:
            assert (g.norm(dim=-1) < 1).all()
            if similarity == "distance":
                assert (logits <= 0).all()  # -d/τ
    h4g, hyp = _model(tiny_bert), _model(tiny_bert, geometry="hyperbolic")
    hyp.load_state_dict({k: v for k, v in h4g.state_dict().items() if not k.startswith("scaling.")})
    assert torch.allclose(radius(h4g.embed_nodes(data)), 0.5 * radius(hyp.embed_nodes(data)), atol=1e-5)


def _align(tiny_bert, data, steps, seed=0, align="node_text", **kw):
    torch.manual_seed(seed)
    model = _model(tiny_bert, **kw)
    task = TagZeroShotTask(TagZeroShotTaskConfig(feature_cache=None, align=align), data.info)
    task.setup(model, _Run(data))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    losses = []
    for step in range(steps):
        items = [data.train[i] for i in order[(step * 16) % 64:(step * 16) % 64 + 16]]
        batch = data.collate_fn(items)
        assert [b.graph_index for b in batch] == [0]  # alignment batches hold the source graph only
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, task, losses


def test_alignment_lowers_info_nce(tiny_bert):
    """InfoNCE over all 64 source nodes at once, before and after 60 steps on batches of 16 (an encoder without
    the ego skip, so it starts near-uniform)."""
    data = _data()
    before, task, _ = _align(tiny_bert, data, steps=0, ego_skip=False)
    whole = data.collate_fn(data.train.items)  # after setup: with the text features
    after, _, _ = _align(tiny_bert, data, steps=60, ego_skip=False)
    with torch.no_grad():
        first, last = float(task.loss(before, whole)), float(task.loss(after, whole))
    assert abs(first - torch.log(torch.tensor(64.0))) < 0.05  # near-uniform at init
    assert last < first - 0.2, (first, last)  # float order varies with threads


@pytest.mark.parametrize("geometry", ["h4g", "hyperbolic", "euclidean"])
def test_untrained_model_starts_at_the_frozen_text_prediction(tiny_bert, geometry):
    """With the ego skip every arm starts where the frozen text features are (the same zero-shot labels); an
    encoder from scratch started at chance and, trained on one source graph, stayed below the text alone."""
    from blocktrain.trainer.graph.task import zero_shot_report

    data = _data()
    model, _, _ = _align(tiny_bert, data, steps=0, geometry=geometry)
    graphs = data.train.graphs
    for g in graphs[1:]:
        pred = model.logits(model.embed_nodes(g), model.embed_texts(g.label_x)).argmax(-1)
        assert torch.equal(pred, (g.x @ g.label_x.t()).argmax(-1)), g.name
    metrics, _ = zero_shot_report(model, graphs, set())
    for g in graphs[1:]:
        assert metrics[f"zeroshot/{g.name}/acc"] == metrics[f"zeroshot/{g.name}/text_only_acc"]


def test_tangent_similarity_in_the_plain_ball_is_the_euclidean_arm(tiny_bert):
    """logmap0(expmap0(u)) = u: the hyperbolic arm with the tangent similarity is the Euclidean pipeline."""
    data = _data()
    hyp, _, _ = _align(tiny_bert, data, steps=3, geometry="hyperbolic", similarity="tangent")
    euc = _model(tiny_bert, geometry="euclidean")
    euc.load_state_dict(hyp.state_dict())
    g = data.train.graphs[1]
    a = hyp.logits(hyp.embed_nodes(g), hyp.embed_texts(g.label_x))
    assert torch.allclose(a, euc.logits(euc.embed_nodes(g), euc.embed_texts(g.label_x)), atol=1e-4)


def test_label_text_alignment_is_cross_entropy_over_the_source_labels(tiny_bert):
    data = _data()
    model, task, _ = _align(tiny_bert, data, steps=0, align="label_text")
    batch = data.collate_fn(data.train.items[:16])
    z = model.embed_nodes(batch[0])[:16]
    logits = model.logits(z, model.embed_texts(data.train.graphs[0].label_x))
    expected = torch.nn.functional.cross_entropy(logits, data.train.graphs[0].y[:16])
    assert torch.allclose(task.loss(model, batch), expected)


def test_alignment_never_sees_target_labels(tiny_bert):
    """Target labels and label texts permuted or scrambled: the aligned weights are bit-identical, so zero-shot
    accuracy is a function of the labels only through the evaluation."""
    first, _, _ = _align(tiny_bert, _data(), steps=6)
    data = _data()
    for g in data.train.graphs[1:]:
        g.y = g.y[torch.randperm(g.num_nodes)]
        g.label_texts = list(reversed(g.label_texts))
    second, task, _ = _align(tiny_bert, data, steps=6)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    sums = task.eval_sums(second, data.collate_fn([data.val[i] for i in range(0, 128, 3)]))
    assert sums["zeroshot/acc"][1] == len(range(0, 128, 3))
    assert sums["zeroshot/heterophilic/acc"][1] + sums["zeroshot/homophilic/acc"][1] == sums["zeroshot/acc"][1]


def test_text_features_are_cached_by_encoder_and_texts(tiny_bert, tmp_path):
    data = _data()
    model = _model(tiny_bert)
    featurize(model, data.train.graphs[:1], "{}", 32, str(tmp_path))
    first = data.train.graphs[0].x
    assert len(list(tmp_path.glob("*.pt"))) == 2  # node texts, label texts
    model.encode_texts = None  # a cache hit never calls the encoder
    featurize(model, data.train.graphs[:1], "{}", 32, str(tmp_path))
    assert torch.equal(first, data.train.graphs[0].x)
    other = _model(tiny_bert, max_length=8)
    featurize(other, data.train.graphs[:1], "{}", 32, str(tmp_path))
    assert len(list(tmp_path.glob("*.pt"))) == 4


def test_text_features_come_back_in_text_order_from_length_sorted_batches(tiny_bert):
    data = _data()
    model = _model(tiny_bert)
    graph = data.train.graphs[0]
    texts = list(graph.texts)
    texts[0] = texts[0] + " " + texts[0]  # a long one first, so sorting moves it
    graph.texts = texts
    batches, encode = [], model.encode_texts
    model.encode_texts = lambda t: batches.append(list(t)) or encode(t)
    featurize(model, [graph], "{}", 32, None)
    one_by_one = torch.cat([encode([t]) for t in texts])  # no padding at all
    assert torch.allclose(graph.x, one_by_one, atol=1e-5)
    assert all(len(a) <= len(b) for batch in batches[:-1] for a, b in zip(batch, batch[1:]))
    assert batches[-2][-1] == texts[0]  # the longest node text is encoded last (the label texts follow)


def test_config_errors_name_the_key():
    with pytest.raises(UserError, match=r"plugin.h4g.c must be > 0"):
        H4GConfig(c=0.0)
    with pytest.raises(UserError, match=r"plugin.h4g.dim \(10\) must be divisible by plugin.h4g.groups \(4\)"):
        H4GConfig(dim=10, text_head=True)
    with pytest.raises(UserError, match=r"plugin.h4g.dim must be null .* unless plugin.h4g.text_head"):
        H4GConfig(dim=16)
    with pytest.raises(UserError, match="plugin.h4g.geometry must be one of"):
        H4GConfig(geometry="spherical")


def test_h4g_synthetic_recipe_end_to_end(tiny_bert, tmp_path):
    run_dir = tmp_path / "run"
    result = train("recipe=h4g_synthetic", f"model.id={tiny_bert}", "data.synthetic_nodes=64", "data.batch_size=16",
                   "data.synthetic_vocab=600", "trainer.max_steps=8", "trainer.check_val_every_n_epoch=1",
                   "plugin.h4g.hidden=16", f"run_dir={run_dir}", "logger=csv",
                   "trainer.enable_progress_bar=false", "task.feature_cache=null", OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    values = metrics["metrics"]
    assert metrics["status"] == "finished" and metrics["optimized_metric"] == "zeroshot/heterophilic/acc"
    for key in ("zeroshot/heterophilic/acc", "zeroshot/homophilic/acc", "zeroshot/target3_h0.8/macro_f1",
                "radius/target1_h0.1/q95", "zeroshot/target1_h0.1/text_only_acc", "val/zeroshot/target2_h0.2/acc", "data/homophily/target3_h0.8"):
        assert key in values, key
    assert values["radius/target1_h0.1/mean"] <= values["radius/target1_h0.1/q95"]
    assert (run_dir / "media").glob("radius_histogram*")
    export = run_dir / "export" / "h4g"
    record = json.loads((export / "h4g_config.json").read_text())
    assert record["plugin"]["geometry"] == "h4g" and record["text_encoder"] == str(tiny_bert)
    model, prompt = load_exported(export)
    assert torch.allclose(model.scaling.weight.diagonal(dim1=-2, dim2=-1).mean(), torch.tensor(0.5), atol=0.2)
    source, (target,) = synthetic_tags(0.5, [0.1], num_nodes=40, vocab_size=600, seed=9)
    labels = predict(model, target, prompt)
    assert len(labels) == 40 and set(labels) <= set(target.label_texts)
