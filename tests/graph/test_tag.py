"""Text-attributed graphs: the synthetic generator's homophily and disjoint topics, the on-disk format and its
errors, the Debian builder on a fixture index, the data kind's batches and the neighbour sampler."""
from __future__ import annotations

import json

import pytest
import torch

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.graph.data import build_graph_data, sample_nodes
from blocktrain.trainer.graph.debian import debian_tags, parse_records, read_packages, strip_name
from blocktrain.trainer.graph.synthetic import synthetic_tags
from blocktrain.trainer.graph.tag import Tag, check_disjoint, load_collection, load_tag, save_collection, save_tag
from blocktrain.trainer.sources.data import build_datasets


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_tags(0.5, [0.1, 0.9], num_nodes=200, num_classes=4, vocab_size=800, seed=3)


def test_synthetic_homophily_is_controlled_and_topics_are_disjoint(synthetic):
    source, (low, high) = synthetic
    assert low.homophily() < 0.2 and high.homophily() > 0.8 and 0.35 < source.homophily() < 0.65
    check_disjoint(source, [low, high])
    words = [set(" ".join(t.texts[i] for i in range(len(t.ids)) if t.labels[i] == lab).split()) for t in (low, high)
             for lab in t.label_names]
    topic_words = [set(text.split(": ")[1].split()) for t in (source, low, high) for text in t.label_texts.values()]
    assert all(not (a & b) for i, a in enumerate(topic_words) for b in topic_words[i + 1:])  # disjoint topics
    assert all(len(w) > 20 for w in words)
    again = synthetic_tags(0.5, [0.1, 0.9], num_nodes=200, num_classes=4, vocab_size=800, seed=3)
    assert again[1][0].texts == low.texts and again[1][0].edges == low.edges


def test_collection_round_trip(synthetic, tmp_path):
    source, targets = synthetic
    save_collection(source, targets, tmp_path)
    s, ts = load_collection(tmp_path)
    assert (s.texts, s.labels, s.edges, s.label_texts) == (source.texts, source.labels, source.edges, source.label_texts)
    assert [t.name for t in ts] == [t.name for t in targets] and ts[0].role == "target"
    data = ts[1].to_data()
    assert data.edge_index.shape[1] >= len(targets[1].edges) and int(data.y.max()) < len(ts[1].label_texts)


def _tag(**changes):
    base = dict(name="g", ids=["a", "b", "c"], texts=["x y", "y z", "z x"], labels=["p", "q", "p"],
                edges=[(0, 1), (1, 2)], label_texts={"p": "label p", "q": "label q"})
    return Tag(**{**base, **changes})


@pytest.mark.parametrize("change,message", [
    ({"edges": [(0, 3)]}, "references a missing node"),
    ({"texts": ["x y", " ", "z"]}, "node b has an empty text"),
    ({"label_texts": {"p": "label p"}}, "label 'q' has no label text"),
])
def test_bad_graphs_are_one_clear_error(change, message, tmp_path):
    with pytest.raises(UserError, match=message):
        _tag(**change).check()
    save_tag(_tag(), tmp_path)
    if "edges" in change:  # the same mistake on disk names the file and line
        (tmp_path / "edges.tsv").write_text("a\tb\nb\tmissing\n")
        with pytest.raises(UserError, match="edges.tsv line 2: edge references missing node 'missing'"):
            load_tag(tmp_path)


def test_overlapping_source_and_target_labels_are_refused(tmp_path):
    """The zero-shot guard: a target label (by name or by text) seen in the source graph fails at build time."""
    source = _tag(name="s")
    with pytest.raises(UserError, match="shares label"):
        check_disjoint(source, [_tag(name="t", labels=["p", "r", "p"], label_texts={"p": "new", "r": "r"})])
    with pytest.raises(UserError, match="shares label"):
        check_disjoint(source, [_tag(name="t", labels=["u", "v", "u"], label_texts={"u": "label q", "v": "v"})])
    with pytest.raises(UserError, match="disjoint"):
        save_collection(source, [_tag(name="t")], tmp_path)
    check_disjoint(source, [_tag(name="t", labels=["u", "v", "u"], label_texts={"u": "u", "v": "v"})])


INDEX = """\
Package: pyfoo
Section: python
Depends: python3 (>= 3.9), libbar1 | libbaz1, pyfoo-data:any
Description: foo tools for Python 3
 pyfoo parses foo files. This package contains pyfoo for Python 3.
Description-md5: 00aa

Package: python3
Section: python
Depends: libbar1
Description: interactive high-level object-oriented language

Package: libbar1
Section: libs
Provides: libbar-any
Description: bar shared library

Package: libbaz1
Section: contrib/libs
Description: baz shared library

Package: pyfoo-data
Section: python
Description: data files

Package: coolgame
Section: games
Depends: coolgame-data, libbar-any, libbar1, sndplay
Recommends: paintit
Description: a cool game with coolgame levels

Package: coolgame-data
Section: games
Description: levels and music

Package: paintit
Section: graphics
Description: paint program

Package: sndplay
Section: sound
Depends: paintit
Description: sound player

Package: ignored
Section: editors
Description: not in any group
"""


def test_debian_builder_on_a_fixture_index(tmp_path):
    (tmp_path / "packages.txt").write_text(INDEX)
    (tmp_path / "Translation-en").write_text("Package: pyfoo\nDescription-md5: 00aa\nDescription-en: long foo text\n"
                                             " pyfoo reads foo files quickly.\n")
    records = read_packages(str(tmp_path / "packages.txt"), str(tmp_path / "Translation-en"))
    source, (target,) = debian_tags(records, ["python", "libs"], [["games", "graphics", "sound"]],
                                    ["Depends", "Pre-Depends", "Recommends"])
    text = dict(zip(source.ids, source.texts))
    assert "pyfoo" not in text["pyfoo"] and "reads foo files quickly" in text["pyfoo"]  # long text, name removed
    assert dict(zip(source.ids, source.labels))["libbaz1"] == "libs"  # component prefix stripped
    named = {(source.ids[s], source.ids[t]) for s, t in source.edges}
    assert named == {("pyfoo", "python3"), ("pyfoo", "libbar1"), ("pyfoo", "libbaz1"), ("pyfoo", "pyfoo-data"),
                     ("python3", "libbar1")}
    named = {(target.ids[s], target.ids[t]) for s, t in target.edges}  # Provides resolved, cross-graph edges gone
    assert named == {("coolgame", "coolgame-data"), ("coolgame", "sndplay"), ("coolgame", "paintit"),
                     ("sndplay", "paintit")}
    assert "ignored" not in source.ids + target.ids and "coolgame" not in target.texts[0]
    assert set(target.label_texts) == {"games", "graphics", "sound"} and abs(target.homophily() - 2 / 8) < 1e-6
    whole, _ = debian_tags(records, ["*"], [["games", "graphics", "sound"]], ["Depends"])  # every other section
    assert set(whole.label_texts) == {"python", "libs", "editors"} and "ignored" in whole.ids
    with pytest.raises(UserError, match="listed twice"):
        debian_tags(records, ["python", "games"], [["games", "sound"]], ["Depends"])
    with pytest.raises(UserError, match="no label text; add it to data.debian_label_texts"):
        debian_tags(records, ["python", "libs"], [["games", "nosuchsection"]], ["Depends"])
    assert strip_name("Tools for foo-bar and foo", "foo") == "Tools for foo-bar and"
    data = build_datasets({"kind": "graph", "builder": "debian", "batch_size": 2,
                           "debian_packages": str(tmp_path / "packages.txt"),
                           "debian_source_sections": ["python", "libs"], "debian_target_sections": ["games, sound"]})
    assert data.info["target_labels"] == {"target1": ["games", "sound"]} and data.info["num_nodes"]["source"] == 5
    assert parse_records("A: 1\n .\n x\n")[0]["A"] == "1\n\nx"


def test_graph_data_kind_batches_sampled_subgraphs(tmp_path):
    cfg = {"kind": "graph", "batch_size": 8, "synthetic_nodes": 60, "synthetic_vocab": 600,
           "target_homophily": [0.1, 0.9], "path": str(tmp_path / "saved")}
    data = build_datasets(cfg)
    assert data.info["heterophilic_targets"] == ["target1_h0.1"] and data.info["homophily"]["target2_h0.9"] > 0.8
    assert {g for g, _ in data.train.items} == {0} and {g for g, _ in data.val.items} == {1, 2}
    assert json.loads((tmp_path / "saved" / "collection.json").read_text())["targets"] == data.info["target_graphs"]
    again = build_datasets({**cfg, "builder": "files"})  # the saved collection reads back as the same graphs
    assert torch.equal(again.train.graphs[1].edge_index, data.train.graphs[1].edge_index)
    for g in data.train.graphs:
        g.x = torch.arange(g.num_nodes, dtype=torch.float).unsqueeze(1)
    batch = data.collate_fn([data.val[i] for i in (0, 1, 60, 2)])
    assert [b.graph_index for b in batch] == [1, 2] and [b.batch_size for b in batch] == [3, 1]
    first = batch[0]
    assert first.n_id[:3].tolist() == [0, 1, 2] and first.x[:, 0].tolist() == first.n_id.float().tolist()
    assert first.n_id.unique().numel() == first.n_id.numel()
    assert torch.equal(first.y, data.train.graphs[1].y[first.n_id])


def test_sample_nodes_reaches_exactly_the_k_hop_neighbourhood():
    # path 0-1-2-3-4 (both directions), as CSR
    rows = [[1], [0, 2], [1, 3], [2, 4], [3]]
    rowptr = torch.tensor([0] + list(torch.tensor([len(r) for r in rows]).cumsum(0)))
    col = torch.tensor([c for r in rows for c in r])
    assert sample_nodes(rowptr, col, torch.tensor([0]), [-1, -1]).tolist() == [0, 1, 2]
    assert sorted(sample_nodes(rowptr, col, torch.tensor([2]), [-1]).tolist()) == [1, 2, 3]
    got = sample_nodes(rowptr, col, torch.tensor([2, 0]), [1, 1], torch.Generator().manual_seed(0))
    assert got[:2].tolist() == [2, 0] and len(got) <= 6 and set(got.tolist()) <= {0, 1, 2, 3, 4}


def test_synthetic_graphs_do_not_depend_on_the_hash_seed():
    """The same graph_seed must give the same graphs in every process (a set's order follows PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    code = ("from blocktrain.trainer.graph.synthetic import synthetic_tags\n"
            "s, t = synthetic_tags(0.5, [0.1], 20, 2, 200, 5, seed=3)\nprint(s.texts[:3], t[0].label_names)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outs) == 1
