"""The BFM network: a shared feature trunk, one velocity stack per time segment, the alignment projector and
the Feature Residual Network (FRN), all from the DiT blocks of ``blocktrain.trainer.generative.layers``."""
from __future__ import annotations

import torch
from torch import nn

from blocktrain.trainer.generative.flow import segment_bounds
from blocktrain.trainer.generative.layers import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
from blocktrain.trainer.sources.models import LoadedModel, ModelSource


def segment_of(t: torch.Tensor, segments: int) -> torch.Tensor:
    """The segment k with t ∈ [σ_{k+1}, σ_k) (t = 0 in the last one): k = ⌊(1 − t)·K⌋ clamped to [0, K−1]."""
    return ((1 - t.double()) * segments).floor().long().clamp(0, segments - 1)


class BFM(nn.Module):
    """Blockwise flow-matching transformer.

    c = t_emb(t) + y_emb(y); trunk: its own patch embed of x_t, ``trunk_depth`` blocks on c -> tokens h;
    velocity: a shared patch embed of x_t, segment k's ``segment_depth`` blocks conditioned per token on
    concat(c, h) (h not detached), a shared final layer; projector: MLP h -> the frozen encoder's feature width;
    FRN: ``frn_depth`` blocks on the trunk's patch embed of x_t and c, predicting h residually in a segment.
    ``ada_rank``: low-rank per-token modulation in the velocity blocks (the official code's adaLN-LoRA, rank 288).
    """

    def __init__(self, image_size=32, channels=1, patch=2, hidden=384, heads=6, segments=6, trunk_depth=8,
                 segment_depth=2, frn_depth=2, mlp_ratio=4.0, num_classes=10, class_dropout=0.1,
                 proj_hidden=2048, align_dim=768, ada_rank=None):
        super().__init__()
        self.image_size, self.channels, self.patch = image_size, channels, patch
        self.segments, self.num_classes = segments, num_classes
        self.t_embed = TimestepEmbedder(hidden)
        self.y_embed = LabelEmbedder(num_classes, hidden, class_dropout)
        self.trunk_embed = PatchEmbed(image_size, channels, patch, hidden)
        self.trunk_blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(trunk_depth))
        self.x_embed = PatchEmbed(image_size, channels, patch, hidden)
        self.stacks = nn.ModuleList(nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, cond_dim=2 * hidden, ada_rank=ada_rank)
                                                  for _ in range(segment_depth)) for _ in range(segments))
        self.final = FinalLayer(hidden, patch, channels, cond_dim=2 * hidden)
        self.projector = nn.Sequential(nn.Linear(hidden, proj_hidden), nn.SiLU(), nn.Linear(proj_hidden, proj_hidden),
                                       nn.SiLU(), nn.Linear(proj_hidden, align_dim))
        self.frn_blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(frn_depth))
        self.frn_out = nn.Linear(hidden, hidden)  # zero-initialised: an untrained FRN predicts h(t_start)
        nn.init.zeros_(self.frn_out.weight)
        nn.init.zeros_(self.frn_out.bias)

    @property
    def grid(self) -> int:
        return self.trunk_embed.grid

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embed(t) + self.y_embed(y)

    def trunk(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.trunk_embed(x)
        for block in self.trunk_blocks:
            h = block(h, c)
        return h

    def velocity(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, segment: int) -> torch.Tensor:
        cond = torch.cat([c[:, None].expand(-1, h.shape[1], -1), h], dim=-1)
        z = self.x_embed(x)
        for block in self.stacks[segment]:
            z = block(z, cond)
        return unpatchify(self.final(z, cond), self.patch, self.channels)

    def frn(self, x: torch.Tensor, c: torch.Tensor, h_start: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        """ĥ(t) = h(x_{t_start}, t_start) + coeff · FRN(patch_embed(x_t), c_t), coeff = (t_start − t)/(t_start − t_end)."""
        r = self.trunk_embed(x)
        for block in self.frn_blocks:
            r = block(r, c)
        return h_start + coeff.view(-1, 1, 1).to(r.dtype) * self.frn_out(r)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, segment: torch.Tensor | int | None = None,
                return_features: bool = False):
        """v(x_t, t, y): each row through its segment's stack (``segment`` per row, one int, or from t)."""
        c = self.condition(t, y)
        h = self.trunk(x, c)
        if segment is None:
            segment = segment_of(t, self.segments)
        if isinstance(segment, int):
            v = self.velocity(x, h, c, segment)
        else:
            v = torch.empty_like(x)
            for k in segment.unique().tolist():
                rows = (segment == k).nonzero().squeeze(1)
                v[rows] = self.velocity(x[rows], h[rows], c[rows], k)
        return (v, h) if return_features else v


def bounds(segment: int, segments: int) -> tuple[float, float]:
    """(t_start, t_end) = (σ_k, σ_{k+1}) of segment k."""
    sigma = segment_bounds(segments)
    return float(sigma[segment]), float(sigma[segment + 1])


def build_bfm(cfg) -> BFM:
    from blocktrain.trainer.generative.config import resolved_size

    hidden, _, heads = resolved_size(cfg)
    return BFM(cfg.image_size, cfg.channels, cfg.patch, hidden, heads, cfg.segments, cfg.trunk_depth,
               cfg.segment_depth, cfg.frn_depth, cfg.mlp_ratio, cfg.num_classes, cfg.class_dropout, cfg.proj_hidden,
               cfg.align_dim, cfg.ada_rank)


BFM_SOURCE = ModelSource(lambda cfg, processor: LoadedModel(build_bfm(cfg), None, "bfm"))
