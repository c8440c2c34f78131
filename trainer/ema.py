"""An exponential moving average of the trained weights, swapped in for evaluation and sampling.

``ema.decay: 0.9999`` turns it on: after every optimiser step each tracked parameter's average moves
``(1 - decay)`` of the way to its value (parameters matching ``ema.targets``, a regex, or every trainable
one). Validation inside and after fit, the ``evaluate`` and ``sample`` stages and the export see the
averaged weights; training continues from the raw ones. The averages ride in every checkpoint.

The average is updated once per optimiser step (not per accumulated micro-batch). The engine runs this
callback first, and an exception (Ctrl-C) raised between a step and its update applies the update before the
interrupt checkpoint is written, so a checkpoint always pairs step-N weights with the average through step N.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import pytorch_lightning as pl
import torch


class EMA(pl.Callback):
    def __init__(self, model: torch.nn.Module, decay: float, targets: str | None = None):
        self.model, self.decay = model, decay
        self.pattern = re.compile(targets) if targets else None
        self.shadow: dict[str, torch.Tensor] = {}
        self._swapped = 0
        self._step = 0  # the optimiser step the average is updated through

    def _tracked(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if self.pattern.search(name) if self.pattern else p.requires_grad:
                yield name, p

    def on_fit_start(self, trainer, pl_module):
        for name, p in self._tracked():  # a later fit phase may train other parameters
            if name not in self.shadow:
                self.shadow[name] = p.detach().clone()
            self.shadow[name] = self.shadow[name].to(p.device)
        self._step = trainer.global_step  # a fresh average, or one restored with its step's weights

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step:  # an accumulated micro-batch: no optimiser step yet
            return
        for name, p in self._tracked():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1 - self.decay)
        self._step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception):
        """Catch up with a step the interrupt landed after, before the interrupt checkpoint is written."""
        if trainer.state.fn == "fit":
            self.on_train_batch_end(trainer, pl_module, None, None, 0)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (nested uses swap once)."""
        self._swapped += 1
        if self._swapped > 1 or not self.shadow:
            try:
                yield
            finally:
                self._swapped -= 1
            return
        params = dict(self.model.named_parameters())
        raw = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in raw.items():
                    params[name].copy_(value)
            self._swapped -= 1

    def on_validation_start(self, trainer, pl_module):
        self._validation = self.swapped()
        self._validation.__enter__()

    def on_validation_end(self, trainer, pl_module):
        self._validation.__exit__(None, None, None)

    def state_dict(self) -> dict:
        return {"shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = dict(state["shadow"])
