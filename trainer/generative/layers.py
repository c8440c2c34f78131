"""DiT/SiT building blocks in plain PyTorch: patchify with fixed 2-D sin-cos positions, time and class
embedders (a null class for classifier-free guidance), adaLN-Zero transformer blocks whose conditioning may
be one vector per sample ``(B, C)`` or one per token ``(B, N, C)`` (BFM's concat(c, h)), and the final layer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table ``(grid*grid, dim)`` (as in MAE/DiT); ``dim`` divisible by 4."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (yy.flatten(), xx.flatten()):
        angles = c[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, N, dim)`` tokens of ``patch``² pixels plus fixed positions."""

    def __init__(self, image_size: int, channels: int, patch: int, dim: int):
        super().__init__()
        self.grid = image_size // patch
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(dim, self.grid)[None], persistent=False)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features (of 1000·t, DiT's scale) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=1))


class LabelEmbedder(nn.Module):
    """Class ids -> vectors; id ``num_classes`` is the null class. In training each label is dropped to
    the null class with probability ``dropout`` (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        if self.training and self.dropout > 0:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.dropout, self.num_classes, y)
        return self.table(y)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _per_token(m: torch.Tensor) -> torch.Tensor:
    """A modulation ``(B, D)`` broadcast over tokens; ``(B, N, D)`` kept."""
    return m[:, None] if m.dim() == 2 else m


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP block with adaLN-Zero modulation from ``cond`` (width ``cond_dim``); ``ada_rank``:
    a low-rank modulation map cond -> rank -> 6·dim (BFM's adaLN-LoRA, cheap when cond is per token)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None,
                 ada_rank: int | None = None):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        low = [nn.Linear(cond_dim or dim, ada_rank, bias=False)] if ada_rank else []
        self.ada = nn.Sequential(nn.SiLU(), *low, nn.Linear(ada_rank or cond_dim or dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x, cond):
        shift1, scale1, gate1, shift2, scale2, gate2 = _per_token(self.ada(cond)).chunk(6, dim=-1)
        b, n, d = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised linear map back to ``patch``² × channels per token."""

    def __init__(self, dim: int, patch: int, channels: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))
        for layer in (self.linear, self.ada[1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, cond):
        shift, scale = _per_token(self.ada(cond)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """``(B, N, patch²·C)`` -> ``(B, C, H, W)`` with a square token grid."""
    b, n, _ = tokens.shape
    g = int(round(n ** 0.5))
    x = tokens.view(b, g, g, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, g * patch, g * patch)
