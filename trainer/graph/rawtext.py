"""Raw-text releases of the citation graphs (Cora, CiteSeer, PubMed, ...) and of WebKB (Cornell, Texas,
Wisconsin) as TAGs, read from a local folder ``data.raw_dir``; a file that is missing there is downloaded
from ``data.raw_urls[name]`` when that is set and reachable.

The two formats the TAG literature passes around, found in ``raw_dir`` as ``<name>.npz``, ``<name>.pt`` or
``<name>_fixed_sbert.pt`` (CiteSeer's is released as ``citeseer2_fixed_sbert.pt``, also accepted):

- ``.pt``: a pickled torch-geometric ``Data`` with ``raw_texts`` (or ``raw_text``; one string per node, in node
  order), ``label_names`` (class names, in class-index order), ``y`` (N,) and ``edge_index`` (2, E) — the
  release of Cora / CiteSeer / PubMed / WikiCS raw texts used by the LLM-on-graphs and zero-shot TAG
  work (``cora_fixed_sbert.pt`` and siblings). Loaded with torch-geometric's ``torch_load`` (weights-only first);
  load only files you trust.
- ``.npz``: ``node_texts`` (N,) strings, ``node_labels`` (N,) class indices, ``edges`` (2, E) node indices and
  ``label_texts`` (C,) class names (the heterophilic-TAG benchmark's WebKB / Actor / Amazon releases).

Node ids are the node indices; label names are the class names, label texts (the zero-shot prompts) those
names with ``_`` as spaces unless ``data.raw_label_texts`` gives one. Nodes whose text is empty are dropped
(with their edges), and the count is logged.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.graph.tag import Tag

log = logging.getLogger(__name__)


def candidates(name: str) -> list[str]:
    """The file names a graph called ``name`` may have in ``raw_dir``, in the order they are tried."""
    return [f"{name}.npz", f"{name}.pt", f"{name}_fixed_sbert.pt", f"{name}2_fixed_sbert.pt"]


def locate(name: str, raw_dir: Path, urls: dict[str, str]) -> Path:
    """The local file of graph ``name``; downloaded from ``urls[name]`` when absent and a URL is given."""
    for f in candidates(name):
        if (raw_dir / f).is_file():
            return raw_dir / f
    where = (f"place one of {', '.join(candidates(name))} in {raw_dir} (data.raw_dir; formats: "
             f"trainer/graph/rawtext.py)")
    url = urls.get(name)
    if url is None:
        raise UserError(f"no raw-text file for graph '{name}': {where}, or set data.raw_urls.{name} to a URL")
    suffix = ".npz" if url.split("?")[0].endswith(".npz") else ".pt"
    from torch_geometric.data import download_url

    try:
        return Path(download_url(url, str(raw_dir), log=False, filename=f"{name}{suffix}"))
    except (OSError, ValueError) as e:  # URLError is an OSError; no network here is the usual case
        raise UserError(f"cannot download graph '{name}' from {url} ({e}): {where}") from None


def _read_npz(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    z = np.load(path, allow_pickle=False)
    missing = [k for k in ("node_texts", "node_labels", "edges", "label_texts") if k not in z.files]
    if missing:
        raise UserError(f"{path} has no '{missing[0]}' (expected node_texts, node_labels, edges, label_texts)")
    return [str(t) for t in z["node_texts"]], z["node_labels"], z["edges"], [str(t) for t in z["label_texts"]]


def _read_pt(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    import torch
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage
    from torch_geometric.io.fs import torch_load

    with torch.serialization.safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage]):
        data = torch_load(str(path), map_location="cpu")  # weights-only unless the file needs more (then a warning)
    texts = getattr(data, "raw_texts", None) or getattr(data, "raw_text", None)
    missing = [k for k, v in (("raw_texts", texts), ("label_names", getattr(data, "label_names", None)),
                              ("y", getattr(data, "y", None)), ("edge_index", getattr(data, "edge_index", None)))
               if v is None]
    if missing:
        raise UserError(f"{path}: expected a torch-geometric Data with raw_texts, label_names, y and edge_index; "
                        f"it has no {missing[0]}")
    return [str(t) for t in texts], data.y.numpy(), data.edge_index.numpy(), [str(n) for n in data.label_names]


def read_raw_tag(name: str, raw_dir: str, urls: dict[str, str] | None = None,
                 label_texts: dict[str, str] | None = None, role: str = "target") -> Tag:
    """The TAG of graph ``name`` from its raw-text file in ``raw_dir`` (see the module docstring)."""
    folder = Path(raw_dir).expanduser()
    path = locate(name, folder, urls or {})
    texts, y, edges, names = (_read_npz if path.suffix == ".npz" else _read_pt)(path)
    y, edges = np.asarray(y).reshape(-1).astype(np.int64), np.asarray(edges).astype(np.int64)
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise UserError(f"{path}: edges must have shape (2, E), got {tuple(edges.shape)}")
    if len(texts) != len(y):
        raise UserError(f"{path}: {len(texts)} node texts but {len(y)} labels")
    if len(y) and not (0 <= y.min() and y.max() < len(names)):
        raise UserError(f"{path}: a node label is outside the {len(names)} classes")
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < len(texts):
        log.warning("graph %s: dropped %d of %d nodes with an empty text", name, len(texts) - len(keep), len(texts))
    position = {old: new for new, old in enumerate(keep)}
    present = sorted({int(y[i]) for i in keep})
    prompt = {n: (label_texts or {}).get(n, n.replace("_", " ")) for n in (names[k] for k in present)}
    return Tag(name, [str(i) for i in keep], [texts[i] for i in keep], [names[int(y[i])] for i in keep],
               [(position[int(s)], position[int(t)]) for s, t in edges.T if int(s) in position and int(t) in position],
               prompt, role, {"builder": "raw_text", "file": path.name})


def raw_text_tags(source: str, targets: list[str], raw_dir: str, urls: dict[str, str] | None = None,
                  label_texts: dict[str, str] | None = None) -> tuple[Tag, list[Tag]]:
    """(source, targets) read by :func:`read_raw_tag`; the zero-shot label check is the caller's."""
    return (read_raw_tag(source, raw_dir, urls, label_texts, "source"),
            [read_raw_tag(t, raw_dir, urls, label_texts) for t in targets])
