"""The fit stage's side of LPViT: the Lightning callback that keeps the fixed masks through every optimiser step,
and the evaluate stage's FLOPs count and block-mask picture."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from blocktrain.trainer.compression.block_sparse import run_block_sparse, run_dense
from blocktrain.trainer.compression.fixed_masks import mask_optimizer

__all__ = ["FixedMaskCallback", "flops_kept", "mask_picture"]


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


@torch.no_grad()
def mask_picture(model: torch.nn.Module, names: list[str], block: tuple[int, int], layers: int = 8, height: int = 96):
    """A PIL picture of the kept blocks (white) of up to ``layers`` layers spread over the model, side by side."""
    from PIL import Image

    picked = [names[round(i * (len(names) - 1) / max(layers - 1, 1))] for i in range(min(layers, len(names)))]
    tiles = []
    for name in dict.fromkeys(picked):
        weight = model.get_submodule(name).weight
        kept = (weight.reshape(weight.shape[0], -1) != 0).float()
        grid = F.max_pool2d(kept[None, None], block, stride=block, ceil_mode=True)[0, 0]
        tile = Image.fromarray((grid.cpu().numpy() * 255).astype("uint8"))
        scale = height / tile.height
        tiles.append(tile.resize((max(1, round(tile.width * scale)), height), Image.NEAREST))
    canvas = Image.new("L", (sum(t.width for t in tiles) + 4 * len(tiles), height), 128)
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 4
    return canvas.convert("RGB")
