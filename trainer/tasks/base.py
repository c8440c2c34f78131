"""The task interface: a loss for training and summed metrics for evaluation."""
from __future__ import annotations

from typing import Any

import torch


class Task:
    """Objective + metrics. ``eval_sums`` returns {metric: (sum, count)} so means are exact over a split."""

    def __init__(self, config, info: dict):
        self.config = config
        self.info = info

    def setup(self, model: torch.nn.Module, run) -> None:
        """Prepare anything the task needs from the model (e.g. tokenised prompts)."""

    def callbacks(self) -> list:
        """Lightning callbacks the task needs (e.g. a zero-shot evaluation before training)."""
        return []

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model: torch.nn.Module, batch: Any) -> dict[str, tuple[float, int]]:
        raise NotImplementedError

    def per_sample_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The loss of each sample, shape [N] (methods that need per-sample gradients, e.g. iCBS, use it)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-sample loss")

    @property
    def has_per_sample_loss(self) -> bool:
        return type(self).per_sample_loss is not Task.per_sample_loss

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        """Derived metrics from the means (e.g. perplexity from mean NLL)."""
        return means

    @staticmethod
    def batch_size(batch: Any) -> int:
        if isinstance(batch, dict):
            return int(next(iter(batch.values())).shape[0])
        return int(batch[0].shape[0])

    @staticmethod
    def num_tokens(batch: Any) -> int | None:
        if isinstance(batch, dict) and "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if isinstance(batch, dict) and "input_ids" in batch:
            return int(batch["input_ids"].numel())
        return None
