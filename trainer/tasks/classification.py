"""Classification tasks: transformers sequence classifiers and image classifiers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


class ImageClassificationTask(Task):
    """Batches are (images, labels); cross-entropy with optional label smoothing, top-1 accuracy."""

    def loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(_logits(model(images)), labels, label_smoothing=self.config.label_smoothing)

    def per_sample_loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(_logits(model(images)).float(), labels, reduction="none")

    def eval_sums(self, model, batch):
        images, labels = batch
        logits = _logits(model(images))
        n = labels.shape[0]
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        return {"loss": (loss, n), "acc": ((logits.argmax(-1) == labels).sum().item(), n)}
