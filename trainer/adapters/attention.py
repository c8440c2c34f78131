"""``nn.MultiheadAttention`` with separate q/k/v ``nn.Linear`` layers, so adapters can wrap them (core).

``nn.MultiheadAttention`` (used by open_clip and OpenAI CLIP) keeps q, k and v in one fused
``in_proj_weight`` and reads ``out_proj.weight`` directly instead of calling ``out_proj``, so LoRA layers
put on them would be bypassed. ``SplitMultiheadAttention`` computes the same attention through four
``nn.Linear`` modules (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), as CLIP-LoRA's
``PlainMultiheadAttentionLoRA`` does; ``split_multihead_attention`` puts them on a model and
``fused_state_dict`` maps their keys back to the fused layout.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.trainer.errors import UserError


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=like.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=like.requires_grad)
    return layer


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = not attended) as an additive float mask; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class SplitMultiheadAttention(nn.Module):
    """Drop-in replacement of an ``nn.MultiheadAttention`` (same inputs, outputs and attention)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UserError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be split into q/k/v layers")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.fused_in_proj = mha._qkv_same_embed_dim  # in_proj_weight (else q/k/v_proj_weight) when re-fused
        if self.fused_in_proj:
            weights = mha.in_proj_weight.chunk(3)
            like = mha.in_proj_weight
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            like = mha.q_proj_weight
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b, like) for w, b in zip(weights, biases))
        self.out_proj = mha.out_proj
        self.train(mha.training)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (N, H, L, D)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        (length, batch, _), source = query.shape, key.shape[0]
        q = self._heads(self.q_proj(query).transpose(0, 1))
        k = self._heads(self.k_proj(key).transpose(0, 1))
        v = self._heads(self.v_proj(value).transpose(0, 1))
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.view(batch, self.num_heads, length, source) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            if causal:
                mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
                mask = _additive(mask, q.dtype)
            weights = F.dropout((scores if mask is None else scores + mask).softmax(-1), p, self.training)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # (N, L, E)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights


def split_multihead_attention(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Replace ``nn.MultiheadAttention`` modules (all, or those ``names``) by ``SplitMultiheadAttention``
    in place; returns their qualified names."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if n and isinstance(m, nn.MultiheadAttention)]
    names = list(names)
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.MultiheadAttention):
            raise UserError(f"{name} is not an nn.MultiheadAttention in {type(model).__name__} "
                            f"(it is {type(module).__name__ if module is not None else 'missing'})")
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, SplitMultiheadAttention(module))
    return names


def split_attention_modules(model: nn.Module) -> dict[str, SplitMultiheadAttention]:
    """The model's ``SplitMultiheadAttention`` modules by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SplitMultiheadAttention)}


def fused_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a state dict of ``model``) with each split attention's q/k/v keys fused back into
    ``nn.MultiheadAttention``'s (``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight``)."""
    state = dict(state)
    for name, module in split_attention_modules(model).items():
        weights = [state.pop(f"{name}.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")]
        if module.fused_in_proj:
            state[f"{name}.in_proj_weight"] = torch.cat(weights)
        else:
            state.update({f"{name}.{p}_proj_weight": w for p, w in zip("qkv", weights)})
        if module.q_proj.bias is not None:
            state[f"{name}.in_proj_bias"] = torch.cat([state.pop(f"{name}.{p}.bias") for p in ("q_proj", "k_proj",
                                                                                              "v_proj")])
    return state
