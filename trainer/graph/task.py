"""Task kind ``tag_zero_shot``: graph–text alignment on the source graph; zero-shot node classification of
the target graphs from label-text prompts.

Alignment (``align``): ``node_text`` is symmetric InfoNCE between each node and its own text (GraphCLIP-style
pairs); ``label_text`` is cross-entropy of each node against the source's label prompts (ZeroG-style). When the
node's own text is also its input feature, ``node_text`` is solved by ignoring the graph.

The model is a *TAG model* (e.g. ``plugins/h4g``'s ``H4GModel``), with:

    encode_texts(texts: list[str]) -> (n, d_text)   frozen text features (the text encoder)
    embed_nodes(data: Data) -> (num_nodes, d)       node embeddings from features ``x`` and ``edge_index``
    embed_texts(features) -> (n, d)                 text embeddings, in the same space
    logits(g, t) -> (n_g, n_t)                      similarity / temperature
    radius(z) -> (n,)                               distance from the origin in that space

``setup`` sets every graph's node features ``x`` (its node texts encoded) and ``label_x`` (its label texts in
the prompt); the targets' labels are never read by the loss, only by the metrics.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from blocktrain.trainer.io import atomic_path

from blocktrain.trainer.tasks.base import Task

REQUIRED = ("encode_texts", "embed_nodes", "embed_texts", "logits", "radius")


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): row i's positive is column i."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@torch.no_grad()
def featurize(model, graphs: list, prompt: str, batch_size: int, cache: str | None = None) -> None:
    """Set ``x`` (node texts) and ``label_x`` (prompted label texts) of every graph with the model's text encoder;
    with ``cache`` (a folder) features are kept there, keyed by the encoder's identity and the texts. Texts are
    encoded in batches of similar length (fewer pad tokens) and returned in their own order."""
    def encode(texts):
        key = None
        if cache is not None:
            import hashlib

            digest = hashlib.sha256(repr((getattr(model, "text_encoder_id", None), texts)).encode()).hexdigest()
            key = Path(cache).expanduser() / f"{digest[:32]}.pt"
            if key.is_file():
                return torch.load(key)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        out = torch.cat([model.encode_texts([texts[j] for j in order[i:i + batch_size]]).float().cpu()
                         for i in range(0, len(texts), batch_size)])[torch.argsort(torch.tensor(order))]
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(key) as tmp:
                torch.save(out, tmp)
        return out

    for g in graphs:
        g.x = encode(list(g.texts))
        g.label_x = encode([prompt.format(t) for t in g.label_texts])


class TagZeroShotTask(Task):
    def setup(self, model, run) -> None:
        from blocktrain.trainer.errors import UserError

        missing = [m for m in REQUIRED if not hasattr(model, m)]
        if missing:
            raise UserError(f"task.kind=tag_zero_shot needs a TAG model (with {', '.join(REQUIRED)}); "
                            f"{type(model).__name__} has no {missing[0]}: add a plugin that builds one, e.g. plugin=[h4g]")
        if run.data is None or not hasattr(run.data.train, "graphs"):
            raise UserError("task.kind=tag_zero_shot needs data.kind=graph")
        self.graphs = run.data.train.graphs
        self.hetero = set(self.info["heterophilic_targets"])
        featurize(model, self.graphs, self.config.prompt, self.config.text_batch_size, self.config.feature_cache)
        run.log({f"data/homophily/{k}": v for k, v in self.info["homophily"].items()}, step=0)

    def loss(self, model, batch) -> torch.Tensor:
        sub = batch[0]  # the source graph's subgraph
        n = sub.batch_size
        z = model.embed_nodes(sub)[:n]
        if self.config.align == "label_text":  # each node against its class's prompt among the source's classes
            labels = model.embed_texts(self.graphs[0].label_x.to(z.device))
            return F.cross_entropy(model.logits(z, labels), sub.y[:n])
        return info_nce(model.logits(z, model.embed_texts(sub.x[:n])))

    def eval_sums(self, model, batch) -> dict[str, tuple[float, int]]:
        sums: dict[str, tuple[float, int]] = {}

        def add(key, value, count):
            s, c = sums.get(key, (0.0, 0))
            sums[key] = (s + float(value), c + count)

        for sub in batch:
            graph = self.graphs[sub.graph_index]
            n = sub.batch_size
            z = model.embed_nodes(sub)[:n]
            labels = model.embed_texts(graph.label_x.to(z.device))
            correct = (model.logits(z, labels).argmax(-1) == sub.y[:n]).sum()
            family = "heterophilic" if graph.name in self.hetero else "homophilic"
            add(f"zeroshot/{graph.name}/acc", correct, n)
            add(f"zeroshot/{family}/acc", correct, n)
            add("zeroshot/acc", correct, n)
            add("radius/mean", model.radius(z).sum(), n)
        return sums

    @staticmethod
    def batch_size(batch) -> int:
        return sum(int(sub.batch_size) for sub in batch)

    @staticmethod
    def num_tokens(batch) -> None:
        return None


@torch.no_grad()
def zero_shot_report(model, graphs: list, hetero: set[str], quantile: float = 0.95) -> tuple[dict, dict]:
    """Full-graph zero-shot metrics of every target graph (``graphs[1:]``): accuracy, macro-F1, the radius
    mean and ``quantile`` of its node and label embeddings; their means over all targets (``zeroshot/acc_mean``)
    and over the heterophilic / homophilic ones.
    ``zeroshot/<graph>/text_only_acc`` is the reference without graph or training: the cosine of the frozen text
    features (unit vectors) of nodes and label prompts. Returns (metrics, {graph name: node radii})."""
    from torchmetrics.functional.classification import multiclass_f1_score

    from torch_geometric.data import Data

    device = next(model.parameters()).device
    metrics, radii = {}, {}
    for g in graphs[1:]:
        data = Data(x=g.x, edge_index=g.edge_index, y=g.y, label_x=g.label_x, num_nodes=g.num_nodes).to(device)
        z = model.embed_nodes(data)
        labels = model.embed_texts(data.label_x)
        pred = model.logits(z, labels).argmax(-1)
        r, rl = model.radius(z), model.radius(labels)
        text_only = (data.x @ data.label_x.t()).argmax(-1)  # the frozen text features alone (cosine), no graph
        radii[g.name] = r.cpu()
        metrics.update({f"zeroshot/{g.name}/acc": float((pred == data.y).float().mean()),
                        f"zeroshot/{g.name}/text_only_acc": float((text_only == data.y).float().mean()),
                        f"zeroshot/{g.name}/macro_f1": float(multiclass_f1_score(pred, data.y, len(g.label_texts),
                                                                                 average="macro")),
                        f"radius/{g.name}/mean": float(r.mean()), f"radius/{g.name}/q{round(quantile * 100)}":
                        float(torch.quantile(r.float(), quantile)), f"radius/{g.name}/labels_mean": float(rl.mean())})
    for m in ("acc", "macro_f1"):
        metrics[f"zeroshot/{m}_mean"] = sum(metrics[f"zeroshot/{g.name}/{m}"] for g in graphs[1:]) / (len(graphs) - 1)
    for family in ("heterophilic", "homophilic"):
        names = [g.name for g in graphs[1:] if (g.name in hetero) == (family == "heterophilic")]
        for m in ("acc", "macro_f1"):
            if names:
                metrics[f"zeroshot/{family}/{m}"] = sum(metrics[f"zeroshot/{n}/{m}"] for n in names) / len(names)
    return metrics, radii
