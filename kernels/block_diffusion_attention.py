"""Block-diffusion attention over the two-stream input ``[x_t ; x_0]`` (length 2L, blocks of L').

The masks are *mask functions* ``mask_mod(b, h, q_idx, kv_idx) -> bool`` written in tensor arithmetic, so one
definition serves both paths:

- reference (CPU, and wherever FlexAttention is not usable): the mask function evaluated on a grid gives a
  dense boolean ``[2L, 2L]`` mask for ``scaled_dot_product_attention``;
- FlexAttention (CUDA): the same mask function compiled to a ``BlockMask`` by ``create_block_mask``.

Mask kinds (q, kv index the 2L positions; positions >= L are the clean stream x_0):

- ``bd3`` (BD3-LM): M_BD (noised q -> noised kv of its block) | M_OBC (noised q -> clean kv of earlier blocks)
  | M_BC (clean q -> clean kv of blocks <= its block);
- ``context_causal`` (NBDiff): M_BD | M_OBC | M_CC (clean q -> clean kv at positions <= its own, token-causal).

``register_hf_attention`` adds the op to transformers' ``AttentionInterface`` as ``"block_diffusion"``: a model
switched to it (``model.set_attn_implementation("block_diffusion")``) takes a dense 4D boolean mask or a
``BlockMask`` as ``attention_mask`` and runs it through :func:`block_diffusion_attention`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from blocktrain.kernels.dispatch import announce, get_backend

MASK_KINDS = ("bd3", "context_causal")


def mask_mod(kind: str, seq_len: int, block_size: int):
    """The mask function of ``kind`` for sequences of ``seq_len`` tokens in blocks of ``block_size``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown block-diffusion mask kind {kind!r}; expected one of {', '.join(MASK_KINDS)}")
    n, lp = seq_len, block_size

    def allowed(b, h, q_idx, kv_idx):
        q_clean, kv_clean = q_idx >= n, kv_idx >= n
        q_pos, kv_pos = q_idx - n * q_clean, kv_idx - n * kv_clean
        bq, bk = q_pos // lp, kv_pos // lp
        same_block_noised = (bq == bk) & ~q_clean & ~kv_clean  # M_BD
        earlier_clean = (bq > bk) & kv_clean & ~q_clean  # M_OBC
        if kind == "bd3":
            clean = (bq >= bk) & q_clean & kv_clean  # M_BC
        else:
            clean = (kv_pos <= q_pos) & q_clean & kv_clean  # M_CC
        return same_block_noised | earlier_clean | clean

    return allowed


def dense_mask(kind: str, seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """The boolean ``[2L, 2L]`` mask (True = may attend) of ``kind``: the reference every path is checked against."""
    idx = torch.arange(2 * seq_len, device=device)
    return mask_mod(kind, seq_len, block_size)(0, 0, idx[:, None], idx[None, :])


def flex_usable(device: torch.device) -> bool:
    """Whether FlexAttention runs here: CUDA tensors, the backend not forced to ``reference``."""
    if device.type != "cuda" or get_backend() == "reference":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def _block_mask(kind: str, seq_len: int, block_size: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod(kind, seq_len, block_size), None, None, 2 * seq_len, 2 * seq_len, device=device)


def attention_mask(kind: str, seq_len: int, block_size: int, device) -> object:
    """The mask to hand to a model for the two-stream input: a ``BlockMask`` where FlexAttention runs,
    else the dense ``[1, 1, 2L, 2L]`` boolean mask."""
    device = torch.device(device)
    if flex_usable(device):
        return _block_mask(kind, seq_len, block_size, str(device))
    return dense_mask(kind, seq_len, block_size, device)[None, None]


def block_diffusion_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask,
                              scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """Attention ``[B, H, Q, D]`` under ``mask``: a ``BlockMask`` (FlexAttention) or a boolean tensor broadcastable
    to ``[B, H, Q, K]`` (SDPA, the reference); ``None`` with ``is_causal`` for a plain causal pass. Key/value heads
    may be fewer than query heads (grouped queries)."""
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(mask, BlockMask):
        announce("block_diffusion_attention", "flex")
        return _compiled_flex()(query, key, value, block_mask=mask, scale=scale,
                                enable_gqa=key.shape[1] != query.shape[1])
    announce("block_diffusion_attention", "reference")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          is_causal=is_causal and mask is None)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature over :func:`block_diffusion_attention`; returns
    ``(output [B, Q, H, D], None)`` as transformers' SDPA function does."""
    is_causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    out = block_diffusion_attention(query, key, value, attention_mask, scale=scaling, is_causal=is_causal)
    return out.transpose(1, 2).contiguous(), None


def register_hf_attention() -> str:
    """Register :func:`hf_attention` (and SDPA's mask builder for ordinary 2D masks) with transformers under
    ``"block_diffusion"``; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("block_diffusion", hf_attention)
    AttentionMaskInterface.register("block_diffusion", sdpa_mask)
    return "block_diffusion"
