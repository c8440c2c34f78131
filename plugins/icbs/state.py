"""Per-layer iCBS state: the current pruned set, the frozen weights, and the tabu list."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blocktrain.trainer.compression.masks import ascending_order, keep_count, row_keep_count

__all__ = ["TabuList", "LayerState", "init_layer_state"]


class TabuList:
    """A FIFO of weight indices holding at most ``maxlen`` (``collections.deque(maxlen=...)`` semantics),
    stored as a ring buffer with per-index counts for vectorised membership."""

    def __init__(self, numel: int, maxlen: int):
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self.buf = torch.full((maxlen,), -1, dtype=torch.long)
        self.head = 0
        self.counts = torch.zeros(numel, dtype=torch.int32)

    def extend(self, idx: torch.Tensor) -> None:
        """Append ``idx`` in order, dropping the oldest entries beyond ``maxlen``."""
        idx = idx.flatten().long().cpu()[-self.maxlen:]
        slots = (self.head + torch.arange(idx.numel())) % self.maxlen
        old = self.buf[slots]
        self.counts.index_add_(0, old[old >= 0], torch.full((int((old >= 0).sum()),), -1, dtype=torch.int32))
        self.buf[slots] = idx
        self.counts.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.int32))
        self.head = (self.head + idx.numel()) % self.maxlen

    def mask(self) -> torch.Tensor:
        """Bool [numel]: True where the index is in the list."""
        return self.counts > 0

    def items(self) -> list[int]:
        """The entries, oldest first."""
        ordered = torch.roll(self.buf, -self.head)
        return ordered[ordered >= 0].tolist()

    def state_dict(self) -> dict:
        return {"maxlen": self.maxlen, "buf": self.buf.clone(), "head": self.head}

    def load_state_dict(self, state: dict) -> None:
        if state["maxlen"] != self.maxlen:
            raise ValueError(f"tabu maxlen {state['maxlen']} != {self.maxlen}")
        self.buf = state["buf"].clone().long()
        self.head = int(state["head"])
        self.counts.zero_()
        valid = self.buf[self.buf >= 0]
        self.counts.index_add_(0, valid, torch.ones(valid.numel(), dtype=torch.int32))


@dataclass
class LayerState:
    """Flat bool tensors over the layer's weights: ``pruned`` (the current mask, frozen ones included) and
    ``frozen`` (never moved); ``tabu`` is None where the layer has no tabu list."""

    pruned: torch.Tensor
    frozen: torch.Tensor
    tabu: TabuList | None


def init_layer_state(scores: torch.Tensor, density: float, per_row: bool, fix_frac_prune: float,
                     fix_frac_keep: float, block_size: int, tabu_frac: float) -> LayerState:
    """Prune the lowest ``scores`` (per output row or per layer), freeze ``fix_frac_prune`` of the pruned set
    (lowest scores) and ``fix_frac_keep`` of the kept set (highest), and size the tabu list as
    round(tabu_frac · free weights); no tabu list when that leaves fewer than ``block_size`` free weights."""
    rows, cols = scores.shape
    ranked = scores if per_row else scores.reshape(1, -1)
    width = ranked.shape[1]
    n_keep = row_keep_count(rows, cols, density) if per_row else keep_count(scores.numel(), density)
    n_prune = width - n_keep
    n_fix_prune = round(n_prune * fix_frac_prune)
    n_fix_keep = round(n_keep * fix_frac_keep)
    order = ascending_order(ranked.float().cpu())
    pruned = torch.zeros(ranked.shape, dtype=torch.bool).scatter_(1, order[:, :n_prune], True)
    frozen = torch.zeros(ranked.shape, dtype=torch.bool).scatter_(1, order[:, :n_fix_prune], True)
    frozen.scatter_(1, order[:, width - n_fix_keep:], True)
    n_free = scores.numel() - int(frozen.sum())
    maxlen = round(tabu_frac * n_free)
    tabu = TabuList(scores.numel(), maxlen) if maxlen > 0 and n_free - maxlen >= block_size else None
    return LayerState(pruned.flatten(), frozen.flatten(), tabu)
