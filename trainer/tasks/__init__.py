"""Tasks: the objective and evaluation metrics of a run, chosen by `task.kind`.

The built-in kinds are registered here like a plugin's (``register_task``); schemas are torch-free
(validated by the CLI), implementations import lazily. Plugin losses add to the task's (``Plugin.loss``).
"""
from __future__ import annotations

from dataclasses import dataclass

from blocktrain.trainer.registry import TASKS, register_task


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


for _kind, _schema, _target in (
        ("sequence_classification", SequenceClassificationTaskConfig, "classification:SequenceClassificationTask"),
        ("causal_lm", CausalLMTaskConfig, "language:CausalLMTask"),
        ("image_classification", ImageClassificationTaskConfig, "classification:ImageClassificationTask")):
    register_task(_kind, _schema, f"blocktrain.trainer.tasks.{_target}")


def validate_task_config(cfg):
    from blocktrain.trainer.validation import validate_node

    return validate_node(cfg, TASKS.entry(cfg.get("kind") if cfg is not None else None).schema, "task")


def build_task(cfg, info: dict):
    """Instantiate the task for ``cfg.kind`` with the data source's ``info`` (labels, class names...)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_object(validate_task_config(cfg))
    return TASKS.load(cfg.kind)(config, info)
