"""Tasks: the objective and evaluation metrics of a run, chosen by `task.kind`.

The built-in kinds are registered here like a plugin's (``register_task``); schemas are torch-free
(validated by the CLI), implementations import lazily. Plugin losses add to the task's (``Plugin.loss``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING

from blocktrain.trainer.registry import TASKS, register_task


@dataclass
class SequenceClassificationTaskConfig:
    kind: str = "sequence_classification"


@dataclass
class CausalLMTaskConfig:
    kind: str = "causal_lm"


@dataclass
class MixupConfig:
    """timm's ``Mixup`` on training batches (DeiT: mixup 0.8, cutmix 1.0, one of them per batch); the targets
    become soft (label-smoothed by ``task.label_smoothing``) and the loss ``SoftTargetCrossEntropy``."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0  # probability of mixing a batch
    switch_prob: float = 0.5  # probability of cutmix rather than mixup when both are on
    mode: str = "batch"  # batch | pair | elem


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher: (1 - alpha) * task loss + alpha * tau^2 * KL(teacher || student) at
    temperature tau (``soft``), or alpha * cross-entropy with the teacher's argmax (``hard``, DeiT's switch); with
    a distillation token the teacher term is on its head."""

    teacher: Dict[str, Any] = field(default_factory=lambda: {"kind": MISSING})  # a model config, as `model`
    alpha: float = 0.5
    tau: float = 1.0
    type: str = "soft"  # soft | hard
    reduction: str = "batchmean"  # KL summed per sample, averaged over the batch; numel: DeiT's sum / (N x classes)
    # the student's distillation token (timm's deit_*_distilled: a second head, head_dist): its output takes the
    # teacher term and the class head the task loss; evaluation averages the two. null = use it where the student has
    # one; true = require one; false = distil the single (averaged) output
    token: Optional[bool] = None


@dataclass
class ImageClassificationTaskConfig:
    kind: str = "image_classification"
    label_smoothing: float = 0.0
    mixup: Optional[MixupConfig] = None  # null = off
    distill: Optional[DistillConfig] = None  # null = off

    @staticmethod
    def check(node) -> None:
        """The option values the schema's types cannot check; one ``UserError`` naming every problem."""
        from blocktrain.trainer.errors import UserError
        from blocktrain.trainer.sources.config import validate_model_config

        m, d = node.mixup, node.distill
        problems = [] if m is None or m.mode in ("batch", "pair", "elem") else [
            f"task.mixup.mode must be batch, pair or elem, got {m.mode!r}"]
        if d is not None:
            problems += [f"task.distill.{msg}" for bad, msg in (
                (not 0 <= d.alpha <= 1, f"alpha must be in [0, 1], got {d.alpha}"),
                (not d.tau > 0, f"tau must be > 0, got {d.tau}"),
                (d.type not in ("soft", "hard"), f"type must be soft or hard, got {d.type!r}"),
                (d.reduction not in ("batchmean", "numel"), f"reduction must be batchmean or numel, got {d.reduction!r}"))
                if bad]
        if problems:
            raise UserError("; ".join(problems))
        if d is not None:
            try:
                validate_model_config(d.teacher)
            except UserError as e:
                raise UserError(f"task.distill.teacher (a model config): {e}") from None


for _kind, _schema, _target in (
        ("sequence_classification", SequenceClassificationTaskConfig, "classification:SequenceClassificationTask"),
        ("causal_lm", CausalLMTaskConfig, "language:CausalLMTask"),
        ("image_classification", ImageClassificationTaskConfig, "classification:ImageClassificationTask")):
    register_task(_kind, _schema, f"blocktrain.trainer.tasks.{_target}")


def validate_task_config(cfg):
    from blocktrain.trainer.validation import validate_node

    schema = TASKS.entry(cfg.get("kind") if cfg is not None else None).schema
    node = validate_node(cfg, schema, "task")
    if hasattr(schema, "check"):  # a schema's own checks of values (ranges, nested configs)
        schema.check(node)
    return node


def build_task(cfg, info: dict):
    """Instantiate the task for ``cfg.kind`` with the data source's ``info`` (labels, class names...)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_object(validate_task_config(cfg))
    return TASKS.load(config.kind)(config, info)
