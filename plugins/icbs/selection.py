"""Which layer each step works on, and which weights form its block."""
from __future__ import annotations

import math
import warnings

import torch

__all__ = ["allocate_steps", "select_block"]


def allocate_steps(numels: dict[str, int], total: int, min_steps: int, generator: torch.Generator) -> list[str]:
    """One layer name per step, shuffled: counts ∝ log10(numel), raised to ``min_steps``, rescaled and rounded
    to ``total`` (a rounding surplus or deficit is taken off a random largest / given to a random smallest
    count). When layers × min_steps > total, some layers get fewer than ``min_steps`` (with a warning)."""
    if not numels:
        raise ValueError("no layers to allocate steps to")
    if len(numels) * min_steps > total:
        warnings.warn(f"{len(numels)} layers x min_steps={min_steps} > {total} steps: some layers get fewer")
    names = list(numels)
    frac = torch.tensor([math.log10(numels[n]) for n in names], dtype=torch.float64)
    steps = torch.round(frac / frac.sum() * total)
    steps[steps < min_steps] = min_steps
    if steps.sum() > 0:  # all zero when total < layers / 2 and min_steps = 0: the loop below hands them out
        steps = torch.round(total * steps / steps.sum())
    steps = steps.long()
    extra = int(steps.sum()) - total
    while extra:
        sign = 1 if extra > 0 else -1
        candidates = torch.nonzero(steps == (steps.max() if sign > 0 else steps.min())).flatten()
        steps[candidates[int(torch.randint(len(candidates), (1,), generator=generator))]] -= sign
        extra -= sign
    plan = [name for name, n in zip(names, steps.tolist()) for _ in range(n)]
    return [plan[i] for i in torch.randperm(len(plan), generator=generator).tolist()]


def select_block(scores: torch.Tensor, pruned: torch.Tensor, frozen: torch.Tensor, tabu: torch.Tensor | None,
                 block_size: int, k: int) -> tuple[torch.Tensor, int]:
    """The block's flat indices, currently-pruned ones first, and how many of them are pruned.

    From the free (not frozen), non-tabu weights: the ``k`` highest-``scores`` pruned ones and the
    ``block_size − k`` lowest-score kept ones (fewer where not enough remain). When ``block_size`` covers
    every free weight, the block is all of them.
    """
    free = ~frozen
    if block_size >= int(free.sum()):
        sel_p, sel_k = torch.nonzero(pruned & free).flatten(), torch.nonzero(~pruned & free).flatten()
        return torch.cat([sel_p, sel_k]), sel_p.numel()
    avail = free if tabu is None else free & ~tabu
    cand_p, cand_k = torch.nonzero(pruned & avail).flatten(), torch.nonzero(~pruned & avail).flatten()
    sel_p = cand_p[torch.topk(scores[cand_p], min(k, cand_p.numel()), largest=True).indices]
    sel_k = cand_k[torch.topk(scores[cand_k], min(block_size - k, cand_k.numel()), largest=False).indices]
    return torch.cat([sel_p, sel_k]), sel_p.numel()
