"""SiT: the single-network velocity transformer v(x_t, t, y) (the flow-matching baseline), and its model source."""
from __future__ import annotations

import torch
from torch import nn

from blocktrain.trainer.generative.config import resolved_size
from blocktrain.trainer.generative.layers import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
from blocktrain.trainer.sources.models import LoadedModel, ModelSource


class SiT(nn.Module):
    """Patchify -> ``depth`` adaLN-Zero blocks conditioned on c = t_emb + y_emb -> final layer -> velocity."""

    def __init__(self, image_size=32, channels=1, patch=2, hidden=384, depth=12, heads=6, mlp_ratio=4.0,
                 num_classes=10, class_dropout=0.1):
        super().__init__()
        self.image_size, self.channels, self.patch, self.num_classes = image_size, channels, patch, num_classes
        self.x_embed = PatchEmbed(image_size, channels, patch, hidden)
        self.t_embed = TimestepEmbedder(hidden)
        self.y_embed = LabelEmbedder(num_classes, hidden, class_dropout)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden, patch, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embed(t) + self.y_embed(y)
        h = self.x_embed(x)
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.final(h, c), self.patch, self.channels)


def build_sit(cfg) -> SiT:
    hidden, depth, heads = resolved_size(cfg)
    return SiT(cfg.image_size, cfg.channels, cfg.patch, hidden, depth, heads, cfg.mlp_ratio, cfg.num_classes,
               cfg.class_dropout)


SIT_SOURCE = ModelSource(lambda cfg, processor: LoadedModel(build_sit(cfg), None, "sit"))
