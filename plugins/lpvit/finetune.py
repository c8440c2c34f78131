"""The fit stage's side of LPViT: the Lightning callback that keeps the fixed masks through every optimiser step,
and the evaluate stage's FLOPs count."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from blocktrain.trainer.compression.block_sparse import run_block_sparse, run_dense
from blocktrain.trainer.compression.fixed_masks import mask_optimizer

__all__ = ["FixedMaskCallback", "flops_kept"]


class FixedMaskCallback(pl.Callback):
    """Masks the optimiser state and weights after every step of a fit (``mask_optimizer``) on a model carrying
    ``weight_mask`` buffers; the weights' gradient hooks already mask the gradients. With ``block``, the masked
    Linears that it tiles run ``block_sparse_linear`` over their kept blocks during the fit (``run_block_sparse``)."""

    def __init__(self, block: tuple[int, int] | None = None):
        self.handles: list = []
        self.block = block

    def on_fit_start(self, trainer, pl_module):
        if self.block is not None:
            run_block_sparse(pl_module, self.block)

    def on_train_start(self, trainer, pl_module):
        self.handles = [mask_optimizer(pl_module, opt) for opt in trainer.optimizers]

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def on_fit_end(self, trainer, pl_module):
        run_dense(pl_module)


@torch.no_grad()
def flops_kept(model: torch.nn.Module, positions: dict[str, tuple[int, int]]) -> float:
    """FLOPs of the layers in ``positions`` ({name: (positions per sample, bias additions)}) counted from their
    non-zero weights, over their dense FLOPs (the code's ``get_model_flops`` on the pruned layers)."""
    kept = dense = 0.0
    for name, (pos, bias) in positions.items():
        weight = model.get_submodule(name).weight
        kept += float(weight.count_nonzero()) * pos + bias
        dense += weight.numel() * pos + bias
    return kept / dense
