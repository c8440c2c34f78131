"""The ``predict`` path: rebuild a trained H4G model from its export and label a new TAG's nodes zero-shot."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from blocktrain.trainer.errors import UserError


def load_trained(model, export_dir: Path) -> None:
    """Load an export's weights (everything but the frozen text encoder) into an ``H4GModel``."""
    from safetensors.torch import load_file

    state = load_file(str(Path(export_dir) / "h4g.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise UserError(f"{export_dir} does not match this H4G model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_exported(export_dir: Path, text_encoder: str | None = None):
    """(model, prompt) from ``export_dir``; the text encoder from the export's record or ``text_encoder``."""
    from transformers import AutoModel, AutoTokenizer

    from blocktrain.plugins.h4g.model import H4GModel
    from blocktrain.plugins.h4g.plugin import CONFIG, H4GConfig
    from blocktrain.trainer.sources.models import resolve_model_id

    export_dir = Path(export_dir)
    if not (export_dir / CONFIG).is_file():
        raise UserError(f"{export_dir} is not an H4G export (no {CONFIG})")
    record = json.loads((export_dir / CONFIG).read_text())
    location, _ = resolve_model_id(text_encoder or record["text_encoder"])
    config = H4GConfig(**record["plugin"])
    model = H4GModel(AutoModel.from_pretrained(location), AutoTokenizer.from_pretrained(location),
                     **config.model_kwargs())
    load_trained(model, export_dir)
    return model.eval(), record["prompt"]


@torch.no_grad()
def predict(model, tag, prompt: str = "{}") -> list[str]:
    """The label name the model gives each node of ``tag`` (a ``Tag``), from its label texts, zero-shot."""
    from blocktrain.trainer.graph.task import featurize

    tag.check()
    data = tag.to_data()
    featurize(model, [data], prompt, 256)
    z = model.embed_nodes(data)
    pred = model.logits(z, model.embed_texts(data.label_x)).argmax(-1)
    return [data.label_names[i] for i in pred.tolist()]
