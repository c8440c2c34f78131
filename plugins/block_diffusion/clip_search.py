"""BD3-LM's data-driven clipped noise schedule: during validation, the variance of the per-block NELBO estimate is
measured for every candidate interval [a, b] (``noise.clip_windows``) on the first val batches; at the end of the
validation epoch the training interval becomes the one with the smallest variance. The reported NELBO is not
affected (always [1e-3, 1])."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from blocktrain.plugins.block_diffusion.noise import clip_windows, sample_t
from blocktrain.plugins.block_diffusion.objective import block_diffusion_loss


class ClipSearch:
    """The summed per-batch variances of each candidate interval, and the choice among them."""

    def __init__(self, eps: float, widths, delta: float, max_batches: int):
        self.windows = clip_windows(eps, widths, delta)
        self.max_batches = max_batches
        self.reset()

    def reset(self) -> None:
        self.variances = {w: 0.0 for w in self.windows}
        self.batches = 0

    @torch.no_grad()
    def record(self, model, x0, scored, *, block_size: int, mask_id: int, mask_kind: str, shift: bool,
               ignore_bos: bool, granularity: str, antithetic: bool) -> None:
        if self.batches >= self.max_batches:
            return
        for lo, hi in self.windows:
            t = sample_t(x0.shape[0], x0.shape[1] // block_size, granularity=granularity, eps_min=lo, eps_max=hi,
                         antithetic=antithetic, device=x0.device)
            blocks = block_diffusion_loss(model, x0, t, block_size=block_size, mask_id=mask_id, mask_kind=mask_kind,
                                          shift=shift, scored=scored, ignore_bos=ignore_bos, per_block=True)["per_block"]
            self.variances[(lo, hi)] += float(blocks.var())
        self.batches += 1

    def choose(self) -> tuple[float, float] | None:
        """The minimum-variance interval (None before any batch was recorded); starts a new search."""
        best = min(self.variances, key=self.variances.get) if self.batches else None
        self.reset()
        return best


class ClipSearchCallback(pl.Callback):
    """At the end of each (non-sanity) validation epoch, move the plugin's training interval to the search's
    choice and log it."""

    def __init__(self, plugin):
        self.plugin = plugin

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        best = self.plugin.clip_search.choose()
        if best is not None:
            self.plugin.eps = best
            pl_module.log("train/clip_eps_min", best[0])
            pl_module.log("train/clip_eps_max", best[1])
