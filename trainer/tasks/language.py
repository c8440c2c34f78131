"""Causal language modelling: next-token cross-entropy; perplexity = exp(mean token NLL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from blocktrain.trainer.tasks.base import Task


def token_nll(model, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the batch and the number of predicted tokens (``labels``, where given, are the
    targets, -100 = not scored; else the input ids)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    targets = batch.get("labels", input_ids)[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return nll, int((targets != -100).sum())


def causal_lm_sample_losses(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM, averaged over each sequence's tokens: shape [N].

    ``batch`` has ``input_ids`` and optionally ``attention_mask`` and ``labels`` (-100 = ignored); without
    labels, the input ids at attended positions are the targets.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    valid = (targets != -100).float()
    return (nll.view_as(valid) * valid).sum(1) / valid.sum(1).clamp(min=1)


class CausalLMTask(Task):
    def per_sample_loss(self, model, batch):
        return causal_lm_sample_losses(model, batch)

    def loss(self, model, batch):
        nll, count = token_nll(model, batch)
        return nll / max(count, 1)

    def eval_sums(self, model, batch):
        nll, count = token_nll(model, batch)
        return {"loss": (nll.item(), count)}

    def finalize(self, means):
        return {**means, "ppl": math.exp(min(means["loss"], 50.0))}
