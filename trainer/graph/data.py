"""Data kind ``graph``: a source TAG and target TAGs as (graph, node) items, batched into sampled subgraphs."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.graph.tag import Tag, check_disjoint, edge_homophily, load_collection, save_collection
from blocktrain.trainer.sources.data import Datasets

log = logging.getLogger(__name__)


class GraphNodes(Dataset):
    """Items ``(graph index, node index)`` over the nodes of ``graphs[i]`` for i in ``which``."""

    def __init__(self, graphs: list, which: list[int]):
        self.graphs = graphs
        self.items = [(g, n) for g in which for n in range(graphs[g].num_nodes)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def sample_nodes(rowptr: torch.Tensor, col: torch.Tensor, seeds: torch.Tensor, num_neighbors: list[int],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The seeds followed by the new nodes reached hop by hop, each frontier node drawing
    ``num_neighbors[h]`` neighbours with replacement (-1: all), from a CSR adjacency (``rowptr``, ``col``)."""
    seen = torch.zeros(rowptr.numel() - 1, dtype=torch.bool)
    seen[seeds] = True
    nodes, frontier = [seeds], seeds
    for k in num_neighbors:
        start, deg = rowptr[frontier], rowptr[frontier + 1] - rowptr[frontier]
        if k == -1:
            pos = torch.repeat_interleave(start - torch.cumsum(deg, 0) + deg, deg) + torch.arange(int(deg.sum()))
        else:
            start, deg = start.repeat_interleave(k), deg.repeat_interleave(k)
            draw = (torch.rand(deg.shape, generator=generator) * deg).long()
            pos = (start + draw)[deg > 0]
        reached = col[pos].unique()
        frontier = reached[~seen[reached]]
        seen[frontier] = True
        nodes.append(frontier)
    return torch.cat(nodes)


class SubgraphCollate:
    """(graph, node) items -> a list of ``Data`` subgraphs, one per graph in the batch: the subgraph induced
    by the seed nodes and their sampled ``num_neighbors``-hop neighbourhood (GraphSAGE-style sampling; the
    seeds come first). Each has ``batch_size``, ``n_id``, ``graph_index``, ``y`` and the graph's node features
    ``x`` once set (the task computes them from the texts). Sampling uses torch's global generator."""

    def __init__(self, graphs: list, num_neighbors: list[int]):
        self.graphs, self.num_neighbors = graphs, list(num_neighbors)
        self._csr: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _adjacency(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        if g not in self._csr:
            data = self.graphs[g]
            row, col = data.edge_index
            order = torch.argsort(row * data.num_nodes + col)
            rowptr = torch.zeros(data.num_nodes + 1, dtype=torch.long)
            rowptr[1:] = torch.cumsum(torch.bincount(row, minlength=data.num_nodes), 0)
            self._csr[g] = (rowptr, col[order])
        return self._csr[g]

    def __call__(self, items):
        from torch_geometric.data import Data
        from torch_geometric.utils import subgraph

        by_graph: dict[int, list[int]] = {}
        for g, n in items:
            by_graph.setdefault(int(g), []).append(int(n))
        batch = []
        for g, seeds in by_graph.items():
            data = self.graphs[g]
            n_id = sample_nodes(*self._adjacency(g), torch.tensor(seeds), self.num_neighbors)
            edge_index, _ = subgraph(n_id, data.edge_index, relabel_nodes=True, num_nodes=data.num_nodes)
            sub = Data(edge_index=edge_index, y=data.y[n_id], n_id=n_id, num_nodes=n_id.numel(),
                       batch_size=len(seeds), graph_index=g)
            if getattr(data, "x", None) is not None:
                sub.x = data.x[n_id]
            batch.append(sub)
        return batch


def _subsample(tag: Tag, max_nodes: int | None, seed: int) -> Tag:
    if max_nodes is None or len(tag.ids) <= max_nodes:
        return tag
    keep = sorted(random.Random(seed).sample(range(len(tag.ids)), max_nodes))
    pos = {old: new for new, old in enumerate(keep)}
    labels = [tag.labels[i] for i in keep]
    return Tag(tag.name, [tag.ids[i] for i in keep], [tag.texts[i] for i in keep], labels,
               [(pos[s], pos[t]) for s, t in tag.edges if s in pos and t in pos],
               {k: v for k, v in tag.label_texts.items() if k in set(labels)}, tag.role, tag.meta)


def build_tags(cfg) -> tuple[Tag, list[Tag]]:
    """(source, targets) as ``cfg.builder`` makes them; saved as a collection at ``cfg.path`` when built."""
    if cfg.builder == "files":
        if cfg.path is None:
            raise UserError("data.builder=files needs data.path, a graph collection folder (collection.json)")
        return load_collection(Path(cfg.path))
    if cfg.builder == "synthetic":
        from blocktrain.trainer.graph.synthetic import synthetic_tags

        source, targets = synthetic_tags(cfg.source_homophily, list(cfg.target_homophily), cfg.synthetic_nodes,
                                         cfg.synthetic_classes, cfg.synthetic_vocab, cfg.synthetic_words,
                                         cfg.synthetic_topic_fraction, cfg.synthetic_degree, cfg.graph_seed)
    elif cfg.builder == "raw_text":
        from blocktrain.trainer.graph.rawtext import raw_text_tags

        source, targets = raw_text_tags(cfg.raw_source, list(cfg.raw_targets), cfg.raw_dir, dict(cfg.raw_urls),
                                        dict(cfg.raw_label_texts))
    else:
        from blocktrain.trainer.graph.debian import debian_tags, read_packages

        records = read_packages(cfg.debian_packages, cfg.debian_translations)
        groups = [[s.strip() for s in entry.split(",") if s.strip()] for entry in cfg.debian_target_sections]
        source, targets = debian_tags(records, list(cfg.debian_source_sections), groups, list(cfg.debian_edge_fields),
                                      dict(cfg.debian_label_texts))
        source = _subsample(source, cfg.debian_max_nodes, cfg.graph_seed)
        targets = [_subsample(t, cfg.debian_max_nodes, cfg.graph_seed + i + 1) for i, t in enumerate(targets)]
    for tag in (source, *targets):
        tag.check()
    check_disjoint(source, targets)
    if cfg.path is not None:
        save_collection(source, targets, Path(cfg.path).expanduser())
    return source, targets


def build_graph_data(cfg, tokenizer=None, seed: int = 0) -> Datasets:
    """Train: the source graph's nodes; val: every target graph's nodes (zero-shot). ``train.graphs`` holds
    the ``Data`` of all graphs (index 0 the source); ``info`` their names, sizes and edge homophily."""
    source, targets = build_tags(cfg)
    graphs = [t.to_data() for t in (source, *targets)]
    homophily = {g.name: edge_homophily(g) for g in graphs}
    for g in graphs:
        log.info("graph %s (%s): %d nodes, %d edges, %d classes, edge homophily %.3f", g.name, g.role, g.num_nodes,
                 g.edge_index.shape[1] // 2, len(g.label_texts), homophily[g.name])
    hetero = [g.name for g in graphs[1:] if homophily[g.name] < cfg.heterophily_threshold]
    collate = SubgraphCollate(graphs, cfg.num_neighbors)
    info = {"graphs": [g.name for g in graphs], "source_graph": source.name,
            "target_graphs": [t.name for t in targets], "heterophilic_targets": hetero,
            "homophily": homophily, "num_nodes": {g.name: int(g.num_nodes) for g in graphs},
            "num_edges": {g.name: int(g.edge_index.shape[1]) for g in graphs},
            "source_labels": source.label_names, "target_labels": {t.name: t.label_names for t in targets}}
    return Datasets(train=GraphNodes(graphs, [0]), val=GraphNodes(graphs, list(range(1, len(graphs)))),
                    collate_fn=collate, info=info)
