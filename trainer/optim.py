"""Optimisers (any class via `_target_`) and step-wise LR schedules with warm-up."""
from __future__ import annotations

import math

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.validation import check_warmup


def param_groups(model: torch.nn.Module, groups: list[dict]) -> list[dict]:
    """The plugins' parameter groups (frozen parameters dropped), then one group of every other
    trainable parameter with the preset's settings. A parameter in two groups is an error."""
    seen: set[int] = set()
    result = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if any(id(p) in seen for p in params):
            raise UserError("a parameter is in two plugin parameter groups; each may be in one")
        seen.update(id(p) for p in params)
        if params:
            result.append({**group, "params": params})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [{"params": rest}, *result] if rest else result


def build_optimizer(cfg: DictConfig, params: list) -> torch.optim.Optimizer:
    """The optimiser preset over ``params`` (parameters or parameter groups)."""
    if not params:
        raise UserError("nothing to train: every parameter is frozen (check the plugins' targets)")
    try:
        return instantiate(cfg, _partial_=True)(params)
    except Exception as exc:  # ImportError of bitsandbytes, TypeError of a wrong keyword, ...
        cause = exc.__cause__ or exc
        raise UserError(f"cannot build optimizer {cfg.get('_target_')}: {cause}") from None


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of the base LR at optimizer step ``s``: linear warm-up, then cosine/linear/constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int | None = None):
    """The ``scheduler`` preset over ``total_steps``; ``warmup_epochs`` (when set) counts ``steps_per_epoch``."""
    base_lr = optimizer.param_groups[0]["lr"]
    min_ratio = cfg.min_lr / base_lr if base_lr else 0.0
    check_warmup(cfg)  # a fit phase's settings may add warmup_steps to the run's warmup_epochs
    epochs = cfg.get("warmup_epochs")
    if epochs is not None and steps_per_epoch is None:
        raise UserError("scheduler.warmup_epochs needs a loop over epochs of data; use scheduler.warmup_steps here")
    warmup = round(epochs * steps_per_epoch) if epochs is not None else cfg.warmup_steps
    schedule = lr_lambda(cfg.kind, warmup, total_steps, min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
