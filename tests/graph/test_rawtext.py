"""Raw-text citation / WebKB builders on tiny fixture files in both released formats (no network)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.graph.rawtext import read_raw_tag
from blocktrain.trainer.sources.data import build_datasets


def write_pt(path, texts, y, edges, label_names):
    from torch_geometric.data import Data

    torch.save(Data(raw_texts=texts, label_names=label_names, y=torch.tensor(y),
                    edge_index=torch.tensor(edges).t().contiguous(), num_nodes=len(texts)), path)


def write_npz(path, texts, y, edges, label_texts):
    np.savez(path, node_texts=np.array(texts), node_labels=np.array(y), edges=np.array(edges).T,
             label_texts=np.array(label_texts))


@pytest.fixture
def raw_dir(tmp_path):
    # "cora" as the citation release (.pt, underscored class names), node 3's text empty
    write_pt(tmp_path / "cora_fixed_sbert.pt", ["neural nets", "genetic search", "backprop", "", "evolution"],
             [0, 1, 0, 1, 1], [(0, 2), (2, 0), (0, 1), (1, 4), (3, 4), (2, 3)], ["Neural_Networks", "Genetic_Algorithms"])
    # "texas" as the heterophilic-TAG release (.npz)
    write_npz(tmp_path / "texas.npz", ["student page", "course page", "faculty page", "another student"],
              [0, 1, 2, 0], [(0, 1), (1, 2), (3, 2), (3, 1)], ["student", "course", "faculty"])
    write_npz(tmp_path / "pubmed.npz", ["insulin", "glucose", "type one"], [0, 1, 0], [(0, 1), (1, 2), (0, 2)],
              ["Diabetes_Type_1", "Diabetes_Type_2"])
    return tmp_path


def test_both_formats_read_as_tags(raw_dir):
    cora = read_raw_tag("cora", str(raw_dir), label_texts={"Theory": "unused", "Neural_Networks": "neural networks"})
    assert cora.ids == ["0", "1", "2", "4"]  # node 3 had an empty text: dropped with its edges
    assert cora.texts == ["neural nets", "genetic search", "backprop", "evolution"]
    assert cora.labels == ["Neural_Networks", "Genetic_Algorithms", "Neural_Networks", "Genetic_Algorithms"]
    assert sorted(cora.edges) == [(0, 1), (0, 2), (1, 3), (2, 0)]
    assert cora.label_texts == {"Neural_Networks": "neural networks", "Genetic_Algorithms": "Genetic Algorithms"}
    assert abs(cora.homophily() - 2 / 3) < 1e-6  # undirected: 0-2 and 1-4 same, 0-1 differs
    texas = read_raw_tag("texas", str(raw_dir))
    assert texas.labels == ["student", "course", "faculty", "student"] and list(texas.label_texts) == \
        ["student", "course", "faculty"] and texas.homophily() == 0.0


def test_raw_text_collection_logs_edge_homophily_of_every_graph(raw_dir, caplog):
    with caplog.at_level(logging.INFO, logger="blocktrain.trainer.graph.data"):
        data = build_datasets({"kind": "graph", "builder": "raw_text", "batch_size": 2, "raw_dir": str(raw_dir),
                               "raw_source": "pubmed", "raw_targets": ["cora", "texas"]})
    homophily = data.info["homophily"]
    assert homophily["pubmed"] == pytest.approx(1 / 3) and homophily["cora"] == pytest.approx(2 / 3)
    assert homophily["texas"] == 0.0 and data.info["heterophilic_targets"] == ["texas"]
    assert data.info["target_labels"]["texas"] == ["student", "course", "faculty"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in ("pubmed", "cora", "texas"):
        assert f"graph {name} " in logged
    assert "edge homophily 0.667" in logged and "edge homophily 0.000" in logged


def test_missing_files_name_the_folder_and_urls_are_fetched(raw_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(UserError, match=rf"place one of citeseer\.npz, .*citeseer2_fixed_sbert\.pt in {empty}"):
        read_raw_tag("citeseer", str(empty))
    with pytest.raises(UserError, match=f"cannot download graph 'texas'.*in {empty}"):
        read_raw_tag("texas", str(empty), {"texas": (empty / "nowhere.npz").as_uri()})
    fetched = read_raw_tag("texas", str(empty), {"texas": (raw_dir / "texas.npz").as_uri()})  # a reachable URL
    assert (empty / "texas.npz").is_file() and fetched.texts[0] == "student page"


def test_bad_raw_files_and_shared_labels_are_one_clear_error(raw_dir):
    write_npz(raw_dir / "bad.npz", ["a", "b"], [0, 5], [(0, 1)], ["x", "y"])
    with pytest.raises(UserError, match="outside the 2 classes"):
        read_raw_tag("bad", str(raw_dir))
    np.savez(raw_dir / "nolabels.npz", node_texts=np.array(["a"]), edges=np.zeros((2, 0), dtype=np.int64))
    with pytest.raises(UserError, match="has no 'node_labels'"):
        read_raw_tag("nolabels", str(raw_dir))
    with pytest.raises(UserError, match="shares label"):  # zero-shot: a target may not reuse the source's classes
        build_datasets({"kind": "graph", "builder": "raw_text", "raw_dir": str(raw_dir), "raw_source": "cora",
                        "raw_targets": ["texas", "cora"]})
