"""The text-attributed-graph kinds, registered like a plugin's: data kind ``graph`` and task kind
``tag_zero_shot`` (graph–text alignment on a source graph, zero-shot node classification on target
graphs). Torch-free, so configs validate before anything heavy loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from blocktrain.trainer.registry import register_data_kind, register_task
from blocktrain.trainer.sources.config import NONNEG, PATH, POSITIVE, DataConfig, choices

_UNIT = {"check": (lambda v: 0 <= v <= 1, "a number in [0, 1]")}
_HOPS = {"check": (lambda v: len(v) > 0 and all(n == -1 or n > 0 for n in v),
                   "a non-empty list of neighbour counts per hop (-1 = all)")}
_UNIT_LIST = {"check": (lambda v: len(v) > 0 and all(0 <= h <= 1 for h in v), "a non-empty list of numbers in [0, 1]")}

DEBIAN_SOURCE = ["libs", "libdevel", "python", "perl", "devel", "haskell", "rust", "golang", "javascript", "java",
                 "ruby", "gnu-r", "php", "ocaml", "lisp", "interpreters", "doc", "debug"]
DEBIAN_TARGETS = ["games,graphics,sound,video,fonts", "admin,net,mail,web,database,editors,science,math"]


@dataclass
class GraphDataConfig(DataConfig):
    """A source TAG (alignment) and target TAGs (zero-shot); see trainer/graph/tag.py for the on-disk format.

    Items are (graph, node) pairs; a batch is a list of torch-geometric ``Data`` subgraphs, one per graph,
    sampled around the batch's seed nodes (the first ``batch_size`` nodes of each) by ``data.sample_nodes``
    (GraphSAGE-style; torch-geometric's NeighborLoader needs pyg-lib or torch-sparse, which PyPI lacks for this torch)."""

    kind: str = "graph"
    batch_size: int = field(default=64, metadata=POSITIVE)
    builder: str = field(default="synthetic", metadata=choices("synthetic", "debian", "raw_text", "files"))
    path: Optional[str] = None  # files: a collection folder; synthetic/debian: where the built collection is saved
    graph_seed: int = 0  # the graphs' own seed (synthetic draws, Debian subsampling), fixed across run seeds
    num_neighbors: List[int] = field(default_factory=lambda: [10, 10], metadata=_HOPS)
    heterophily_threshold: float = field(default=0.5, metadata=_UNIT)  # targets below: reported as heterophilic
    synthetic_nodes: int = field(default=300, metadata=POSITIVE)
    synthetic_classes: int = field(default=4, metadata=POSITIVE)
    synthetic_vocab: int = field(default=2000, metadata=POSITIVE)
    synthetic_words: int = field(default=30, metadata=POSITIVE)
    synthetic_topic_fraction: float = field(default=0.7, metadata=_UNIT)
    synthetic_degree: float = field(default=8.0, metadata=POSITIVE)
    source_homophily: float = field(default=0.5, metadata=_UNIT)
    target_homophily: List[float] = field(default_factory=lambda: [0.1, 0.2, 0.8], metadata=_UNIT_LIST)
    debian_packages: Optional[str] = field(default=None, metadata=PATH)  # `apt-cache dumpavail` output; null = run it
    debian_translations: Optional[str] = field(default=None, metadata=PATH)  # a Translation-en file (long texts)
    debian_source_sections: List[str] = field(default_factory=lambda: list(DEBIAN_SOURCE))  # ["*"]: all the rest
    debian_target_sections: List[str] = field(default_factory=lambda: list(DEBIAN_TARGETS))  # one graph per entry
    debian_edge_fields: List[str] = field(default_factory=lambda: ["Depends", "Pre-Depends", "Recommends"])
    debian_label_texts: Dict[str, str] = field(default_factory=dict)  # extra or replaced section texts
    debian_max_nodes: Optional[int] = field(default=None, metadata=POSITIVE)  # per graph, seeded subsample
    raw_dir: str = "~/.cache/blocktrain/raw_tags"  # raw_text: where <name>.npz / <name>.pt are (trainer/graph/rawtext.py)
    raw_source: str = "pubmed"
    raw_targets: List[str] = field(default_factory=lambda: ["cora", "citeseer", "cornell", "texas", "wisconsin"])
    raw_urls: Dict[str, str] = field(default_factory=dict)  # graph name -> a URL to fetch its file from when absent
    raw_label_texts: Dict[str, str] = field(default_factory=dict)  # class name -> label text (default: the name)


@dataclass
class TagZeroShotTaskConfig:
    """Graph–text InfoNCE on the source graph; zero-shot node classification of the targets from label texts."""

    kind: str = "tag_zero_shot"
    align: str = field(default="node_text", metadata=choices("node_text", "label_text"))  # the source's alignment target
    prompt: str = "{}"  # template around each label text, e.g. "packages for {}"
    text_batch_size: int = field(default=256, metadata=POSITIVE)  # texts per text-encoder call
    radius_quantile: float = field(default=0.95, metadata=_UNIT)  # logged with the mean radius
    # text features kept here, keyed by the text encoder's identity (model.text_encoder_id) and the texts; null = none
    feature_cache: Optional[str] = "~/.cache/blocktrain/text_features"


register_data_kind("graph", GraphDataConfig, "blocktrain.trainer.graph.data:build_graph_data")
register_task("tag_zero_shot", TagZeroShotTaskConfig, "blocktrain.trainer.graph.task:TagZeroShotTask")
