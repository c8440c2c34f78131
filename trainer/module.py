"""The LightningModule every run uses: model + task + plugins, engine-owned optimisation."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import pytorch_lightning as pl

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.optim import build_optimizer, build_scheduler, param_groups


class NonFiniteLoss(UserError):
    """Training produced a NaN/inf loss; the run stops and keeps its last good checkpoint."""


class RunModule(pl.LightningModule):
    """One fit phase (or evaluation) of the run's model; ``prefix`` keeps a named phase's metrics apart."""

    def __init__(self, model, task, plugins, optim_cfg, scheduler_cfg, run, prefix: str = ""):
        super().__init__()
        self.model = model
        self.task = task
        self.plugins = plugins
        self.optim_cfg = optim_cfg
        self.scheduler_cfg = scheduler_cfg
        self.run = run
        self.prefix = prefix
        self._eval_means: dict = {}  # metric name -> torchmetrics MeanMetric

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.model.train()  # hub models load in eval mode; Lightning keeps the mode it finds

    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        """Every plugin's named loss terms, and the task's (``task``) unless a plugin replaces it."""
        terms: dict[str, torch.Tensor] = {}
        for plugin in self.plugins:
            out = plugin.loss(self.model, batch, self.run)
            if isinstance(out, torch.Tensor):
                terms[plugin.name] = out
            elif out is not None:
                terms.update({f"{plugin.name}/{k}": v for k, v in out.items()})
        if self.task is not None and not any(p.replaces_task_loss for p in self.plugins):
            terms["task"] = self.task.loss(self.model, batch)
        if not terms:
            raise UserError("no objective: configure a task (task=...) or a plugin that defines a loss")
        return terms

    def training_step(self, batch, batch_idx):
        terms = self.loss_terms(batch)
        loss = sum(terms.values())
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLoss(f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopped. "
                                "The last good checkpoint is kept; lower optim.lr or check the data.")
        distributed = self.trainer.world_size > 1
        p = self.prefix
        self.log(f"{p}train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, sync_dist=distributed)
        if len(terms) > 1:
            self.log_dict({f"{p}train/loss/{k}": v.detach() for k, v in terms.items()}, on_step=True, on_epoch=False,
                          sync_dist=distributed)
        self.log(f"{p}train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    # -- evaluation: exact means over the whole split, reduced across ranks by torchmetrics ----------
    def on_validation_epoch_start(self):
        self._eval_means = {}

    def has_eval_metrics(self) -> bool:
        """Whether a validate loop measures anything: a task, or a plugin with its own ``eval_sums``."""
        from blocktrain.trainer.plugin import Plugin

        return self.task is not None or any(type(p).eval_sums is not Plugin.eval_sums for p in self.plugins)

    def validation_step(self, batch, batch_idx):
        from torchmetrics import MeanMetric

        sums = dict(self.task.eval_sums(self.model, batch)) if self.task is not None else {}
        for plugin in self.plugins:
            sums.update(plugin.eval_sums(self.model, batch, self.run))
        for name, (total, count) in sums.items():
            if name not in self._eval_means:  # sum/count over the split and all ranks = a count-weighted mean
                self._eval_means[name] = MeanMetric(nan_strategy="error").set_dtype(torch.float64).to(self.device)
            count = float(count)
            self._eval_means[name].update(float(total) / count if count else 0.0, weight=count)

    def on_validation_epoch_end(self):
        if not self._eval_means:
            return
        means = {name: float(metric.compute()) for name, metric in sorted(self._eval_means.items())}
        means = {name: value for name, value in means.items() if value == value}  # NaN: no samples on any rank
        for name, value in (self.task.finalize(means) if self.task is not None else means).items():
            self.log(f"{self.prefix}val/{name}", value, on_epoch=True, sync_dist=False, rank_zero_only=True)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = [g for plugin in self.plugins for g in plugin.param_groups(self.model, self.run)]
        optimizer = build_optimizer(self.optim_cfg, param_groups(self.model, groups))
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(self.scheduler_cfg, optimizer, total, self._steps_per_epoch())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> int | None:
        """Optimiser steps per epoch of the training loader, for ``scheduler.warmup_epochs`` (None: not asked for, or
        an iterable dataset without a length)."""
        if self.scheduler_cfg.get("warmup_epochs") is None:
            return None
        if self.trainer.train_dataloader is None:  # as estimated_stepping_batches does when it needs the length
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        return math.ceil(batches / self.trainer.accumulate_grad_batches) if math.isfinite(batches) else None

    # -- resume: plugin state and RNG streams ride in every checkpoint -----------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["plugins"] = {p.name: p.state_dict() for p in self.plugins}
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, checkpoint):
        for plugin in self.plugins:
            plugin.load_state_dict(checkpoint.get("plugins", {}).get(plugin.name, {}))
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
