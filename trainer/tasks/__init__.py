"""Tasks: the objective and evaluation metrics of a run, chosen by `task.kind`.

Schemas and the registry are torch-free (validated by the CLI); implementations import lazily.
A plugin may replace the objective (``Plugin.loss``); the task still provides the metrics.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from blocktrain.trainer.errors import UserError


@dataclass
class SequenceClassificationTaskConfig:
    kind: str = "sequence_classification"


@dataclass
class CausalLMTaskConfig:
    kind: str = "causal_lm"


@dataclass
class ImageClassificationTaskConfig:
    kind: str = "image_classification"
    label_smoothing: float = 0.0


@dataclass
class ClipFewShotTaskConfig:
    """CLIP few-shot classification (CLIP-LoRA): CE on logit_scale·cos(image, text) over all class prompts."""

    kind: str = "clip_few_shot"
    logit_scale: float = 100.0  # fixed, as CLIP-LoRA; the model's learned logit_scale is not used
    train_template: Optional[str] = None  # null = the data's first template (CLIP-LoRA); e.g. "a photo of a {}."
    text_chunk_size: Optional[int] = None  # prompts per text-tower call; null = all at once
    text_checkpointing: bool = False  # recompute the text tower in backward, chunk by chunk (bounds memory)
    zero_shot: bool = True  # evaluate before training, logged as val/zero_shot_acc


TASKS: dict[str, tuple[type, str]] = {
    "sequence_classification": (SequenceClassificationTaskConfig, "blocktrain.trainer.tasks.classification:SequenceClassificationTask"),
    "causal_lm": (CausalLMTaskConfig, "blocktrain.trainer.tasks.language:CausalLMTask"),
    "image_classification": (ImageClassificationTaskConfig, "blocktrain.trainer.tasks.classification:ImageClassificationTask"),
    "clip_few_shot": (ClipFewShotTaskConfig, "blocktrain.trainer.tasks.clip:ClipFewShotTask"),
}


def register_task(kind: str, schema: type, target: str) -> None:
    """Add a task kind (plugins with their own data protocol, e.g. CLIP few-shot, register one)."""
    TASKS[kind] = (schema, target)


def validate_task_config(cfg):
    from blocktrain.trainer.validation import kind_schema, validate_node

    return validate_node(cfg, kind_schema(cfg, {k: s for k, (s, _) in TASKS.items()}, "task"), "task")


def build_task(cfg, info: dict):
    """Instantiate the task for ``cfg.kind`` with the data source's ``info`` (labels, class names...)."""
    from omegaconf import OmegaConf

    if cfg.kind not in TASKS:
        raise UserError(f"unknown task.kind '{cfg.kind}'. Valid kinds: {', '.join(TASKS)}")
    module, _, attr = TASKS[cfg.kind][1].partition(":")
    config = OmegaConf.to_object(validate_task_config(cfg))
    return getattr(importlib.import_module(module), attr)(config, info)
