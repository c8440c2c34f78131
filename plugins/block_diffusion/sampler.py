"""Semi-autoregressive block-diffusion sampling with a KV cache over committed blocks.

Blocks are generated left to right after a prompt (its whole blocks are the committed context, its remainder
opens the first generated block). Each block starts fully masked (with the
one-position logit shift, NBDiff, its first token is taken AR-style from the last committed position's logit)
and is denoised by up to ``steps`` forward passes over the block, each attending the cached keys/values of the
committed tokens and the whole block bidirectionally. After each pass, masked positions are committed by a
strategy:

- ``first_hitting`` (BD3-LM's default): one uniformly chosen masked position per pass (``steps`` is ignored);
- ``sequential``: the leftmost ones, k per pass (SDAR);
- ``low_confidence_static``: the k most confident (SDAR, LLaDA), k from an even split of the block over ``steps``;
- ``low_confidence_dynamic``: every one above ``threshold``, and at least the k most confident (SDAR's threshold
  with its top-k fallback; keeping the static k guarantees a block is complete after ``steps`` passes, and a
  block filled early ends its passes early).

A finished block is run once more to store its keys/values, under the same mask the committed context has in
training (block-causal for ``bd3``, token-causal for ``context_causal``). ``kv_cache=False`` recomputes the
whole sequence at every pass instead: the check that the cache changes nothing.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from blocktrain.plugins.block_diffusion.objective import subs_log_probs
from blocktrain.plugins.block_diffusion.plugin import STRATEGIES
from blocktrain.trainer.errors import UserError



@dataclass
class SampleStats:
    tokens: int  # generated tokens, all rows
    seconds: float
    nfe: int  # denoising forward passes (a pass serves every row)
    commit_passes: int  # passes that store a finished block's keys/values (0 without the cache)
    per_row: int  # generated tokens per row

    @property
    def nfe_per_token(self) -> float:
        return self.nfe / max(self.per_row, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def context_mask(length: int, block_size: int, mask_kind: str, device) -> torch.Tensor:
    """How committed tokens attend each other: block-causal (``bd3``) or token-causal (``context_causal``)."""
    i = torch.arange(length, device=device)
    if mask_kind == "bd3":
        return (i[None] // block_size) <= (i[:, None] // block_size)
    return i[None] <= i[:, None]


def _transfer_counts(masked: int, steps: int) -> list[int]:
    """Tokens to commit per pass: ``masked`` split as evenly as possible over ``steps`` passes, larger first."""
    base, extra = divmod(masked, steps)
    return [base + (s < extra) for s in range(steps)]


def _choose(logits, mask_id, temperature, generator):
    """Proposed tokens and their probabilities under SUBS (greedy at temperature 0)."""
    logp = subs_log_probs(logits, mask_id)
    if temperature == 0:
        conf, x0 = logp.max(-1)
        return x0, conf.exp()
    probs = (logp / temperature).softmax(-1)
    x0 = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1)


def _commit(x, x0, conf, mask_id, strategy, k, threshold, generator):
    masked = x == mask_id
    if strategy == "first_hitting":
        score, k = torch.rand(x.shape, device=x.device, generator=generator), 1
    elif strategy == "sequential":
        score = -torch.arange(x.shape[1], device=x.device, dtype=torch.float).expand_as(x)
    else:
        score = conf.float()
    score = score.masked_fill(~masked, float("-inf"))
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    commit = (rank < k) & masked
    if strategy == "low_confidence_dynamic":
        commit |= masked & (conf > threshold)
    return torch.where(commit, x0, x)


def _forward(model, ids, mask, positions, cache=None):
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers >= 5.2x
    return model(input_ids=ids, attention_mask=mask[None, None], position_ids=positions[None].expand(ids.shape[0], -1),
                 use_cache=cache is not None, **{key: cache})


@torch.no_grad()
def sample_blocks(model, prompt: torch.Tensor, *, num_blocks: int, block_size: int, mask_id: int,
                  mask_kind: str = "bd3", shift: bool = False, steps: int | None = None,
                  strategy: str = "first_hitting", threshold: float = 0.9, temperature: float = 0.0,
                  kv_cache: bool = True, generator: torch.Generator | None = None) -> tuple[torch.Tensor, SampleStats]:
    """``prompt [N, P]`` continued to ``P // block_size + num_blocks`` blocks: ``(tokens, stats)``. The prompt's whole
    blocks are committed context; its remainder (P mod block_size tokens) opens the first generated block."""
    n, length = prompt.shape
    if length == 0:
        raise UserError("the sampler needs a prompt of at least one token")
    if strategy not in STRATEGIES:
        raise UserError(f"plugin.block_diffusion.sampler.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if steps is not None and steps < 1:
        raise UserError(f"plugin.block_diffusion.sampler.steps={steps}: a block needs at least 1 forward pass (NFE >= 1)")
    whole = length - length % block_size
    dev = prompt.device
    x, nfe, commits = prompt[:, :whole], 0, 0
    start = time.perf_counter()
    cache = last = None
    if kv_cache:
        from transformers import DynamicCache

        cache = DynamicCache()
        if whole:
            last = _forward(model, x, context_mask(whole, block_size, mask_kind, dev), torch.arange(whole, device=dev),
                            cache).logits[:, -1]
            commits += 1
    for b in range(num_blocks):
        c = x.shape[1]
        block = torch.full((n, block_size), mask_id, dtype=x.dtype, device=dev)
        if b == 0:
            block[:, :length - whole] = prompt[:, whole:]
        if shift and block[0, 0] == mask_id:  # the AR head proposes a block's first token
            if not kv_cache:
                last = _forward(model, x, context_mask(c, block_size, mask_kind, dev), torch.arange(c, device=dev)).logits[:, -1]
            block[:, 0] = _choose(last, mask_id, temperature, generator)[0]
        to_fill = int((block[0] == mask_id).sum())
        passes = to_fill if strategy == "first_hitting" or steps is None else min(steps, to_fill)
        for k in _transfer_counts(to_fill, passes) if to_fill else []:
            if not (block == mask_id).any():
                break
            if kv_cache:
                logits = _forward(model, block, torch.ones(block_size, c + block_size, dtype=torch.bool, device=dev),
                                  torch.arange(c, c + block_size, device=dev), cache).logits
                cache.crop(-block_size)
            else:
                full = torch.ones(c + block_size, c + block_size, dtype=torch.bool, device=dev)
                full[:c] = False
                full[:c, :c] = context_mask(c, block_size, mask_kind, dev)
                logits = _forward(model, torch.cat([x, block], 1), full,
                                  torch.arange(c + block_size, device=dev)).logits[:, c:]
            nfe += 1
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            x0, conf = _choose(logits, mask_id, temperature, generator)
            block = _commit(block, x0, conf, mask_id, strategy, k, threshold, generator)
        if kv_cache:
            own = torch.ones(block_size, c + block_size, dtype=torch.bool, device=dev)
            own[:, c:] = context_mask(block_size, block_size, mask_kind, dev)
            last = _forward(model, block, own, torch.arange(c, c + block_size, device=dev), cache).logits[:, -1]
            commits += 1
        x = torch.cat([x, block], 1)
    seconds = time.perf_counter() - start
    per_row = x.shape[1] - length
    return x, SampleStats(tokens=n * per_row, seconds=seconds, nfe=nfe, commit_passes=commits, per_row=per_row)
