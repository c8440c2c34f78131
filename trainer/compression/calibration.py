"""Calibration data for compression plugins: N samples of the data source's train split, drawn by seed, through
its calibration view (``Datasets.calibration``: no random augmentation; the evaluation transform of an image set).

A text corpus gives N windows of ``data.seq_len`` tokens (``{"input_ids", "labels"}`` batches); an image set
gives N images (``(images, labels)`` batches). Batches are collated by the source's ``collate_fn``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import default_collate

from blocktrain.trainer.errors import UserError

__all__ = ["calibration_batches", "model_inputs", "calibration_forward", "to_device", "without_stochastic_depth"]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def calibration_batches(data, samples: int, batch_size: int, seed: int, device: torch.device | str = "cpu",
                        where: str = "calibration") -> list:
    """``samples`` items of the train split (a seeded random subset, without replacement) in batches of
    ``batch_size``, read through ``data.calibration`` where the source has it (un-augmented), else ``data.train``."""
    if data is None or data.train is None:
        raise UserError(f"{where} needs a data source with a train split (data=...)")
    source = data.calibration if getattr(data, "calibration", None) is not None else data.train
    size = len(source)
    if samples > size:
        raise UserError(f"{where}.samples={samples} but the train split has only {size} samples; lower it, or give "
                        "the data source more (text: more files, a smaller data.stride, no data.max_sequences)")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    collate = data.collate_fn or default_collate
    return [to_device(collate([source[i] for i in order[s:s + batch_size]]), device)
            for s in range(0, samples, batch_size)]


def model_inputs(batch: Any) -> Any:
    """What the model reads from a batch: a mapping without its ``labels``, or the first item of a tuple."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def calibration_forward(model: torch.nn.Module, batch: Any) -> Any:
    """One forward pass of ``model`` on a calibration batch (no loss computed)."""
    inputs = model_inputs(batch)
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@contextmanager
def without_stochastic_depth(model: torch.nn.Module) -> Iterator[None]:
    """Stochastic depth off for the duration (timm's ``DropPath`` and transformers' ``*DropPath``: every module
    whose class name ends in ``DropPath`` and that has a ``drop_prob``), so that a train-mode calibration pass sees
    the model as one built without it; the rates are restored after."""
    saved = [(m, m.drop_prob) for m in model.modules() if type(m).__name__.endswith("DropPath") and hasattr(m, "drop_prob")]
    for m, _ in saved:
        m.drop_prob = 0.0
    try:
        yield
    finally:
        for m, rate in saved:
            m.drop_prob = rate
