"""Text-attributed graphs (TAGs): the in-memory form, the on-disk format, checks and edge homophily.

On disk a TAG is a folder:

    nodes.jsonl    one node per line: {"id": "<unique id>", "text": "<node text>", "label": "<label name>"}
    edges.tsv      one directed edge per line: "<source id>\t<target id>" (no header; may be empty)
    labels.json    {"<label name>": "<label text used as the zero-shot prompt>", ...}
    meta.json      {"name": "...", "role": "source" | "target", "builder": "...", ...}

and a *collection* (what data kind ``graph`` reads) is a folder of TAG folders plus ``collection.json``:
``{"source": "<folder>", "targets": ["<folder>", ...]}``. In memory a TAG is :class:`Tag`; ``to_data()``
gives torch-geometric's ``Data`` (undirected ``edge_index``, ``y``, ``texts``, ``label_texts``, ``name``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blocktrain.trainer.errors import UserError


@dataclass
class Tag:
    """One text-attributed graph: node texts, directed edges (as index pairs), labels and label texts."""

    name: str
    ids: list[str]
    texts: list[str]
    labels: list[str]  # the label name of each node
    edges: list[tuple[int, int]]
    label_texts: dict[str, str]  # label name -> prompt text; its order is the class order
    role: str = "target"
    meta: dict = field(default_factory=dict)

    def check(self) -> None:
        """``UserError`` for edges to missing nodes, empty texts, or a label without a label text."""
        n = len(self.ids)
        if not (len(self.texts) == len(self.labels) == n):
            raise UserError(f"graph {self.name}: {n} ids, {len(self.texts)} texts, {len(self.labels)} labels")
        if n == 0:
            raise UserError(f"graph {self.name} has no nodes")
        if len(set(self.ids)) != n:
            raise UserError(f"graph {self.name}: node ids are not unique")
        for i, text in enumerate(self.texts):
            if not str(text).strip():
                raise UserError(f"graph {self.name}: node {self.ids[i]} has an empty text")
        bad = next(((s, t) for s, t in self.edges if not (0 <= s < n and 0 <= t < n)), None)
        if bad is not None:
            raise UserError(f"graph {self.name}: edge {bad} references a missing node (there are {n})")
        missing = sorted(set(self.labels) - set(self.label_texts))
        if missing:
            raise UserError(f"graph {self.name}: label '{missing[0]}' has no label text (labels.json)")
        empty = [k for k, v in self.label_texts.items() if not str(v).strip()]
        if empty:
            raise UserError(f"graph {self.name}: label '{empty[0]}' has an empty label text")

    @property
    def label_names(self) -> list[str]:
        return list(self.label_texts)

    def to_data(self):
        """torch-geometric ``Data``: undirected ``edge_index`` without self-loops, ``y`` (class indices),
        ``texts``, ``label_names``, ``label_texts`` (in class order), ``name``, ``role``."""
        from torch_geometric.data import Data
        from torch_geometric.utils import remove_self_loops, to_undirected

        index = {name: i for i, name in enumerate(self.label_texts)}
        edge_index = torch.tensor(self.edges, dtype=torch.long).t().reshape(2, -1)
        edge_index = to_undirected(remove_self_loops(edge_index)[0], num_nodes=len(self.ids))
        return Data(edge_index=edge_index, y=torch.tensor([index[l] for l in self.labels], dtype=torch.long),
                    num_nodes=len(self.ids), texts=list(self.texts), label_names=self.label_names,
                    label_texts=list(self.label_texts.values()), name=self.name, role=self.role)

    def homophily(self) -> float:
        return edge_homophily(self.to_data())


def edge_homophily(data) -> float:
    """The fraction of edges joining two nodes of the same label (torch-geometric's edge homophily);
    NaN for a graph without edges."""
    from torch_geometric.utils import homophily

    if data.edge_index.numel() == 0:
        return float("nan")
    return float(homophily(data.edge_index, data.y, method="edge"))


def check_disjoint(source: Tag, targets: list[Tag]) -> None:
    """Zero-shot protocol: no target label (name or text) may appear among the source's labels."""
    seen_names, seen_texts = set(source.label_texts), set(source.label_texts.values())
    for t in targets:
        shared = sorted((set(t.label_texts) & seen_names) | {k for k, v in t.label_texts.items() if v in seen_texts})
        if shared:
            raise UserError(f"target graph {t.name} shares label(s) {', '.join(shared)} with the source graph "
                            f"{source.name}: zero-shot evaluation needs disjoint source and target label sets")


# -- on-disk format ------------------------------------------------------------------------------
def save_tag(tag: Tag, folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "nodes.jsonl", "w", encoding="utf-8") as f:
        for i, t, l in zip(tag.ids, tag.texts, tag.labels):
            f.write(json.dumps({"id": i, "text": t, "label": l}) + "\n")
    (folder / "edges.tsv").write_text("".join(f"{tag.ids[s]}\t{tag.ids[t]}\n" for s, t in tag.edges), encoding="utf-8")
    (folder / "labels.json").write_text(json.dumps(tag.label_texts, indent=1), encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({"name": tag.name, "role": tag.role, **tag.meta}, indent=1))
    return folder


def load_tag(folder: Path) -> Tag:
    """Read a TAG folder; ``UserError`` for a missing file, a bad line, an edge to a missing node, an
    empty text or a label without text."""
    folder = Path(folder).expanduser()
    for f in ("nodes.jsonl", "edges.tsv", "labels.json"):
        if not (folder / f).is_file():
            raise UserError(f"graph folder {folder} has no {f} (see trainer/graph/tag.py for the format)")
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    ids, texts, labels = [], [], []
    for n, line in enumerate((folder / "nodes.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ids.append(str(rec["id"]))
            texts.append(str(rec.get("text") or ""))
            labels.append(str(rec["label"]))
        except (ValueError, KeyError) as e:
            raise UserError(f"{folder / 'nodes.jsonl'} line {n}: expected {{\"id\", \"text\", \"label\"}} ({e})")
    position = {i: k for k, i in enumerate(ids)}
    edges = []
    for n, line in enumerate((folder / "edges.tsv").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise UserError(f"{folder / 'edges.tsv'} line {n}: expected '<source id>\\t<target id>'")
        missing = [p for p in parts if p not in position]
        if missing:
            raise UserError(f"{folder / 'edges.tsv'} line {n}: edge references missing node '{missing[0]}'")
        edges.append((position[parts[0]], position[parts[1]]))
    label_texts = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    tag = Tag(meta.get("name", folder.name), ids, texts, labels, edges, label_texts, meta.get("role", "target"),
              {k: v for k, v in meta.items() if k not in ("name", "role")})
    tag.check()
    return tag


def save_collection(source: Tag, targets: list[Tag], folder: Path) -> Path:
    """Write a source and its targets as a collection (after checking their label sets are disjoint)."""
    check_disjoint(source, targets)
    folder = Path(folder)
    source.role = "source"
    save_tag(source, folder / source.name)
    for t in targets:
        t.role = "target"
        save_tag(t, folder / t.name)
    (folder / "collection.json").write_text(json.dumps({"source": source.name, "targets": [t.name for t in targets]}))
    return folder


def load_collection(folder: Path) -> tuple[Tag, list[Tag]]:
    folder = Path(folder).expanduser()
    if not (folder / "collection.json").is_file():
        raise UserError(f"{folder} is not a graph collection: no collection.json (data.path)")
    spec = json.loads((folder / "collection.json").read_text())
    source, targets = load_tag(folder / spec["source"]), [load_tag(folder / t) for t in spec["targets"]]
    if not targets:
        raise UserError(f"graph collection {folder} lists no target graphs")
    check_disjoint(source, targets)
    return source, targets
