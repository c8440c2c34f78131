"""Semi-autoregressive block-diffusion sampling with a KV cache over committed blocks.

Blocks are generated left to right after a prompt (its whole blocks are the committed context, its remainder
opens the first generated block). Each block starts fully masked (with the
one-position logit shift, NBDiff, its first token is taken AR-style from the last committed position's logit)
and is denoised by up to ``steps`` forward passes over the block, each attending the cached keys/values of the
committed tokens and the whole block bidirectionally. After each pass, masked positions are committed by a
strategy:

- ``first_hitting`` (BD3-LM's default): one uniformly chosen masked position per pass (``steps`` is ignored);
- ``ddpm`` (BD3-LM's ``first_hitting=False``): ``steps`` time points t = 1, 1 - 1/T, ... per block; each masked
  position is unmasked with probability (t - s)/t (all at the last point). While a pass changes no token the
  denoiser's output is reused without a forward pass (BD3-LM's DDPM caching), so NFE <= T;
- ``sequential``: the leftmost ones, k per pass (SDAR);
- ``low_confidence_static``: the k most confident (SDAR, LLaDA), k from an even split of the block over ``steps``;
- ``low_confidence_dynamic``: every one above ``threshold``, and at least the k most confident (SDAR's threshold
  with its top-k fallback; keeping the static k guarantees a block is complete after ``steps`` passes, and a
  block filled early ends its passes early);
- ``entropy_bounded`` (SDAR): the lowest-entropy positions while their summed predictive entropy stays under
  ``entropy_bound``, at least one (and at least the static k, as above);
- ``confidence_threshold`` (NBDiff): the block is split into ``sub_blocks`` decoded left to right; each pass
  commits the most confident masked position of the current sub-block and every one above ``threshold``
  (``steps`` is ignored).

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
from blocktrain.plugins.block_diffusion.plugin import STEP_FREE_STRATEGIES, STRATEGIES
from blocktrain.trainer.errors import UserError



@dataclass
class SampleStats:
    tokens: int  # generated tokens, all rows
    seconds: float
    nfe: int  # denoising forward passes (a pass serves every row)
    commit_passes: int  # passes that store a finished block's keys/values (0 without the cache)
    per_row: int  # generated tokens per row
    row_passes: int = 0  # over rows: the denoising passes each row needed (the NFE it would take sampled alone)

    @property
    def nfe_per_token(self) -> float:
        return self.nfe / max(self.per_row, 1)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a row commits per denoising pass it needs (a batch's NFE is set by its slowest row)."""
        return self.tokens / max(self.row_passes, 1)

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
    """Proposed tokens, their probabilities and each position's predictive entropy under SUBS (greedy at
    temperature 0; the entropy is then that of the model's own distribution)."""
    logp = subs_log_probs(logits, mask_id)
    probs = (logp / temperature).softmax(-1) if temperature > 0 else logp.exp()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    if temperature == 0:
        conf, x0 = probs.max(-1)
        return x0, conf, entropy
    x0 = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])
    return x0, probs.gather(-1, x0[..., None]).squeeze(-1), entropy


@dataclass
class CommitRule:
    """How a pass commits masked positions (see the module docstring)."""

    strategy: str
    threshold: float = 0.9
    entropy_bound: float = 0.35
    sub_blocks: int = 1


def _top(score, allowed, k):
    """Per row, the ``k`` (a number or a ``[N, 1]`` tensor) best-scored allowed positions."""
    score = score.masked_fill(~allowed, float("-inf"))
    rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return (rank < k) & allowed


def _commit(x, x0, conf, entropy, mask_id, rule: CommitRule, k, step_frac, generator):
    """``x`` with the positions chosen this pass set to their proposals ``x0``. ``k``: the static per-pass count;
    ``step_frac``: DDPM's unmasking probability (t - s) / t of this pass."""
    masked = x == mask_id
    strategy = rule.strategy
    if strategy == "first_hitting":
        commit = _top(torch.rand(x.shape, device=x.device, generator=generator), masked, 1)
    elif strategy == "ddpm":
        commit = masked & (torch.rand(x.shape, device=x.device, generator=generator) < step_frac)
    elif strategy == "sequential":
        commit = _top(-torch.arange(x.shape[1], device=x.device, dtype=torch.float).expand_as(x), masked, k)
    elif strategy == "entropy_bounded":  # the most certain positions while their summed entropy stays under the bound
        ranked = entropy.masked_fill(~masked, float("inf")).sort(dim=1).values
        fits = ((ranked.cumsum(1) < rule.entropy_bound) & ranked.isfinite()).sum(1, keepdim=True)
        commit = _top(-entropy.float(), masked, fits.clamp(min=k))
    elif strategy == "confidence_threshold":  # NBDiff: within the leftmost unfinished sub-block
        width = x.shape[1] // rule.sub_blocks
        sub = torch.arange(x.shape[1], device=x.device) // width
        current = torch.where(masked, sub, rule.sub_blocks).min(1, keepdim=True).values
        candidates = masked & (sub == current)
        commit = _top(conf.float(), candidates, 1) | (candidates & (conf > rule.threshold))
    else:
        commit = _top(conf.float(), masked, k)
        if strategy == "low_confidence_dynamic":
            commit |= masked & (conf > rule.threshold)
    return torch.where(commit, x0, x)


def _forward(model, ids, mask, positions, cache=None, keep: int = 0):
    """The model's logits over ``ids``; over the last ``keep`` positions only when ``keep`` > 0 (the model then skips
    the output head elsewhere, where it can: transformers' ``logits_to_keep``)."""
    params = inspect.signature(model.forward).parameters
    extra = {"cache" if "cache" in params else "past_key_values": cache}  # transformers >= 5.2x: cache
    if keep and "logits_to_keep" in params:
        extra["logits_to_keep"] = keep
    logits = model(input_ids=ids, attention_mask=mask[None, None], position_ids=positions[None].expand(ids.shape[0], -1),
                   use_cache=cache is not None, **extra).logits
    return logits[:, -keep:] if keep else logits


def _passes(strategy: str, to_fill: int, steps: int | None) -> int:
    """Passes over a block with ``to_fill`` masked tokens (an upper bound on its NFE)."""
    if strategy in STEP_FREE_STRATEGIES:  # at least one token per pass, until the block is full
        return to_fill
    if strategy == "ddpm":  # steps time points t = 1, 1 - 1/T, ...; the last unmasks every remaining token
        return steps or to_fill
    return min(steps, to_fill) if steps else to_fill


@torch.no_grad()
def sample_blocks(model, prompt: torch.Tensor, *, num_blocks: int, block_size: int, mask_id: int,
                  mask_kind: str = "bd3", shift: bool = False, steps: int | None = None,
                  strategy: str = "first_hitting", threshold: float = 0.9, entropy_bound: float = 0.35,
                  sub_blocks: int = 1, temperature: float = 0.0, kv_cache: bool = True,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, SampleStats]:
    """``prompt [N, P]`` continued to ``P // block_size + num_blocks`` blocks: ``(tokens, stats)``. The prompt's whole
    blocks are committed context; its remainder (P mod block_size tokens) opens the first generated block."""
    n, length = prompt.shape
    if length == 0:
        raise UserError("the sampler needs a prompt of at least one token")
    if strategy not in STRATEGIES:
        raise UserError(f"plugin.block_diffusion.sampler.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if steps is not None and steps < 1:
        raise UserError(f"plugin.block_diffusion.sampler.steps={steps}: a block needs at least 1 forward pass (NFE >= 1)")
    if sub_blocks < 1 or block_size % sub_blocks:
        raise UserError(f"plugin.block_diffusion.sampler.sub_blocks={sub_blocks} must divide the block size {block_size}")
    rule = CommitRule(strategy, threshold, entropy_bound, sub_blocks)
    whole = length - length % block_size
    dev = prompt.device
    x, nfe, commits, row_passes = prompt[:, :whole], 0, 0, 0
    start = time.perf_counter()
    cache = last = None
    if kv_cache:
        from transformers import DynamicCache

        cache = DynamicCache()
        if whole:
            last = _forward(model, x, context_mask(whole, block_size, mask_kind, dev), torch.arange(whole, device=dev),
                            cache, keep=1)[:, -1]
            commits += 1
    for b in range(num_blocks):
        c = x.shape[1]
        block = torch.full((n, block_size), mask_id, dtype=x.dtype, device=dev)
        if b == 0:
            block[:, :length - whole] = prompt[:, whole:]
        if shift and block[0, 0] == mask_id:  # the AR head proposes a block's first token
            if not kv_cache:
                last = _forward(model, x, context_mask(c, block_size, mask_kind, dev), torch.arange(c, device=dev),
                                keep=1)[:, -1]
            block[:, 0] = _choose(last, mask_id, temperature, generator)[0]
        to_fill = int((block[0] == mask_id).sum())
        passes = _passes(strategy, to_fill, steps)
        counts = _transfer_counts(to_fill, passes) if to_fill else []
        reuse = None  # DDPM caching: the denoiser's output stays valid while no token changes
        changed = torch.ones(n, dtype=torch.bool, device=dev)  # per row: since its last denoiser output
        for i in range(passes):
            if not (block == mask_id).any():
                break
            if reuse is not None:
                logits = reuse
            elif kv_cache:
                logits = _forward(model, block, torch.ones(block_size, c + block_size, dtype=torch.bool, device=dev),
                                  torch.arange(c, c + block_size, device=dev), cache)
                cache.crop(-block_size)
                nfe += 1
            else:
                full = torch.ones(c + block_size, c + block_size, dtype=torch.bool, device=dev)
                full[:c] = False
                full[:c, :c] = context_mask(c, block_size, mask_kind, dev)
                logits = _forward(model, torch.cat([x, block], 1), full,
                                  torch.arange(c + block_size, device=dev), keep=block_size)
                nfe += 1
            if shift and reuse is None:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            x0, conf, entropy = _choose(logits, mask_id, temperature, generator)
            row_passes += int(((block == mask_id).any(1) & changed).sum())
            new = _commit(block, x0, conf, entropy, mask_id, rule, counts[i], 1 / (passes - i), generator)
            changed = (new != block).any(1)
            reuse = logits if strategy == "ddpm" and not changed.any() else None
            block = new
        if kv_cache:
            own = torch.ones(block_size, c + block_size, dtype=torch.bool, device=dev)
            own[:, c:] = context_mask(block_size, block_size, mask_kind, dev)
            last = _forward(model, block, own, torch.arange(c, c + block_size, device=dev), cache, keep=1)[:, -1]
            commits += 1
        x = torch.cat([x, block], 1)
    seconds = time.perf_counter() - start
    per_row = x.shape[1] - length
    return x, SampleStats(tokens=n * per_row, seconds=seconds, nfe=nfe, commit_passes=commits, per_row=per_row,
                          row_passes=row_passes)


@torch.no_grad()
def judge_nll(judge, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Per row, the summed NLL (nats) of ``tokens[:, start:]`` under an AR ``judge`` given the tokens before it
    (Gen-PPL = exp(sum / count)); one plain causal pass."""
    vocab = judge.get_output_embeddings().weight.shape[0]
    if int(tokens.max()) >= vocab:
        raise UserError(f"the Gen-PPL judge has {vocab} output tokens but a sample holds id {int(tokens.max())}: "
                        "the judge must share the sampled model's tokenizer")
    logits = judge(input_ids=tokens).logits[:, start - 1:-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, start:], reduction="none").sum(1)
