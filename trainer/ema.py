"""An exponential moving average of the trained weights, swapped in for evaluation and sampling.

``ema.decay: 0.9999`` turns it on: after every optimiser step each tracked parameter's average moves
``(1 - decay)`` of the way to its value (parameters matching ``ema.targets``, a regex, or every trainable
one). Validation inside and after fit, the ``evaluate`` and ``sample`` stages and the export see the
averaged weights; training continues from the raw ones. The averages ride in every checkpoint.
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

    def _tracked(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if self.pattern.search(name) if self.pattern else p.requires_grad:
                yield name, p

    def on_fit_start(self, trainer, pl_module):
        for name, p in self._tracked():  # a later fit phase may train other parameters
            if name not in self.shadow:
                self.shadow[name] = p.detach().clone()
            self.shadow[name] = self.shadow[name].to(p.device)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, p in self._tracked():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), 1 - self.decay)

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
