"""Classification tasks: transformers sequence classifiers and image classifiers."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.tasks.base import Task


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


class SequenceClassificationTask(Task):
    """Batches are dicts with ``labels``; the model computes its own cross-entropy."""

    def loss(self, model, batch):
        return model(**batch).loss

    def per_sample_loss(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return F.cross_entropy(model(**inputs).logits.float(), batch["labels"], reduction="none")

    def eval_sums(self, model, batch):
        out = model(**batch)
        n = batch["labels"].shape[0]
        correct = (out.logits.argmax(-1) == batch["labels"]).sum().item()
        return {"loss": (out.loss.item() * n, n), "acc": (correct, n)}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, base: torch.Tensor, alpha: float, tau: float,
                      kind: str = "soft", reduction: str = "batchmean") -> torch.Tensor:
    """(1 - alpha) * ``base`` + alpha * the distillation term: soft, tau^2 * KL(softmax(teacher/tau) ||
    softmax(student/tau)) summed over classes and divided by the batch size (``batchmean``) or by N x classes
    (``numel``, as DeiT's code); hard, cross-entropy with the teacher's argmax."""
    if kind == "hard":
        term = F.cross_entropy(student, teacher.argmax(-1))
    else:
        kl = F.kl_div(F.log_softmax(student.float() / tau, -1), F.log_softmax(teacher.float() / tau, -1),
                      reduction="sum", log_target=True)
        term = kl * tau * tau / (student.numel() if reduction == "numel" else student.shape[0])
    return (1 - alpha) * base + alpha * term


def distillation_head(model):
    """The module of ``model`` that switches a distillation token's head on in training (timm's
    ``VisionTransformerDistilled.set_distilled_training``), or None."""
    return next((m for m in model.modules() if callable(getattr(m, "set_distilled_training", None))), None)


@contextmanager
def both_heads(owner):
    """``owner``'s training forward returns (class head, distillation head) for the duration (timm averages the
    two unless told otherwise, and always in eval mode); ``owner`` None: nothing changes."""
    if owner is None:
        yield
        return
    before = owner.distilled_training
    owner.set_distilled_training(True)
    try:
        yield
    finally:
        owner.set_distilled_training(before)


def _num_classes(model) -> int | None:
    """A timm model's ``num_classes`` or a transformers model's ``config.num_labels``."""
    n = getattr(model, "num_classes", None)
    return n if n is not None else getattr(getattr(model, "config", None), "num_labels", None)


class ImageClassificationTask(Task):
    """Batches are (images, labels); cross-entropy with optional label smoothing, top-1 accuracy. Options for
    training (evaluation is always plain cross-entropy and accuracy): ``mixup`` (timm's Mixup/CutMix with soft
    targets and ``SoftTargetCrossEntropy``) and ``distill`` (a frozen teacher, ``distillation_loss``; on a student
    with a distillation token, the task loss on the class head and the teacher term on the token's head)."""

    def __init__(self, config, info: dict):
        super().__init__(config, info)
        self.mixup = self.teacher = self.token = None

    def setup(self, model, run) -> None:
        classes = self.info.get("num_labels") or _num_classes(model)
        if classes is None and (self.config.mixup is not None or self.config.distill is not None):
            raise UserError("task.mixup and task.distill need the number of classes: the data gives no num_labels "
                            "and the model no num_classes / config.num_labels")
        if self.config.mixup is not None:
            from timm.data import Mixup

            m = self.config.mixup
            self.mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                               switch_prob=m.switch_prob, mode=m.mode, label_smoothing=self.config.label_smoothing,
                               num_classes=classes)
        if self.config.distill is not None:
            from omegaconf import OmegaConf

            from blocktrain.trainer.sources.models import load_model

            teacher = load_model(OmegaConf.create(self.config.distill.teacher)).model
            n = _num_classes(teacher)
            if n != classes:
                raise UserError(f"task.distill.teacher has {n} classes but the student has {classes}: the teacher "
                                "must be trained on the same labels (a timm teacher takes "
                                f"task.distill.teacher.num_classes={classes} with its own checkpoint)")
            self.teacher = teacher.eval().requires_grad_(False)
            token = self.config.distill.token
            self.token = distillation_head(model) if token is not False else None
            if token and self.token is None:
                raise UserError(f"task.distill.token=true but the student ({type(model).__name__}) has no "
                                "distillation token (timm: a deit_*_distilled_* model); set it to null or false")

    def loss(self, model, batch):
        images, labels = batch
        if self.mixup is not None:
            if len(labels) % 2:  # timm's Mixup pairs samples: an odd last batch loses one
                images, labels = images[:-1], labels[:-1]
            images, targets = self.mixup(images, labels)
        with both_heads(self.token):
            output = model(images)
        logits, distilled = output if isinstance(output, tuple) else (_logits(output),) * 2
        if self.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            base = SoftTargetCrossEntropy()(logits, targets)
        else:
            base = F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        if self.teacher is None:
            return base
        with torch.no_grad():
            teacher = _logits(self.teacher.to(images.device)(images))
        d = self.config.distill
        return distillation_loss(distilled, teacher, base, d.alpha, d.tau, d.type, d.reduction)

    def per_sample_loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(_logits(model(images)).float(), labels, reduction="none")

    def eval_sums(self, model, batch):
        images, labels = batch
        logits = _logits(model(images))
        n = labels.shape[0]
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        return {"loss": (loss, n), "acc": ((logits.argmax(-1) == labels).sum().item(), n)}
