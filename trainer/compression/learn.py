"""Learning inside the calibrate stage, owned by the engine: a post-training method that learns parameters
block by block (quantizer steps, rounding, scales) supplies only the parameters, the loss on a batch and
the number of steps; the optimiser and scheduler come from the run's presets (``conf/optim``,
``conf/scheduler``, with the calibrate stage's own ``optim``/``scheduler`` settings on top), gradient
clipping from ``trainer.gradient_clip_val``, mixed precision from ``trainer.precision``, and the loss is
shown on the progress bar and logged.
"""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
from omegaconf import OmegaConf

from blocktrain.trainer.optim import build_optimizer, build_scheduler

__all__ = ["autocast", "learn"]

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(run):
    """Autocast at the run's ``trainer.precision`` (``bf16-mixed``/``16-mixed``) on its device, else nothing."""
    dtype = _AUTOCAST.get(str(run.cfg.trainer.get("precision")))
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(run.device).type, dtype=dtype)


def learn(run, params: list, loss_fn: Callable[[Any], torch.Tensor], batches: Iterable, steps: int,
          name: str, log_every: int = 10) -> list[float]:
    """``steps`` optimiser steps on ``loss_fn(batch)`` over ``batches`` (cycled); returns the losses.

    ``params``: parameters or parameter groups (``{"params": [...], "lr": ...}``). ``name`` prefixes the
    logged loss (``<name>/loss``) and the progress bar.
    """
    settings = run.stage.settings if getattr(run, "stage", None) is not None else {}
    optim_cfg = OmegaConf.merge(run.cfg.optim, settings.get("optim") or {})
    optimizer = build_optimizer(optim_cfg, params)
    scheduler = build_scheduler(OmegaConf.merge(run.cfg.scheduler, settings.get("scheduler") or {}), optimizer, steps)
    clip = run.cfg.trainer.get("gradient_clip_val")
    by_value = run.cfg.trainer.get("gradient_clip_algorithm") == "value"
    scaler = torch.amp.GradScaler(enabled=str(run.cfg.trainer.get("precision")) == "16-mixed")
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    for step, batch in zip(run.progress(range(steps), total=steps, description=name), itertools.cycle(batches)):
        with autocast(run):
            loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            if by_value:
                torch.nn.utils.clip_grad_value_(trained, clip)
            else:
                torch.nn.utils.clip_grad_norm_(trained, clip)
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
        if step % log_every == 0 or step == steps - 1:  # the lr this step used
            run.log({f"{name}/loss": losses[-1], f"{name}/lr": optimizer.param_groups[0]["lr"]})
        scheduler.step()
    return losses
