"""CBQ's cross-block dependency (§3): overlapping sliding windows of ``size`` consecutive blocks, ``overlap``
of them shared with the next window; a block is finalised (hard-rounded) once it leaves the window."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Window", "window_schedule"]


@dataclass(frozen=True)
class Window:
    """Blocks [start, stop) optimised jointly; ``finalize``: the blocks no later window contains."""

    start: int
    stop: int
    finalize: tuple[int, ...]


def window_schedule(n_blocks: int, size: int = 2, overlap: int = 1) -> list[Window]:
    """Windows [0, size), [size − overlap, ...), ... covering every block; the last one ends at ``n_blocks``.

    ``size=2, overlap=1``: {0,1}, {1,2}, …: every block but the first and the last is optimised twice.
    ``size=1, overlap=0``: one block at a time (BRECQ-style block-wise reconstruction).
    """
    if n_blocks < 1 or size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need n_blocks >= 1, size >= 1 and 0 <= overlap < size; got {n_blocks}, {size}, {overlap}")
    windows, start = [], 0
    while True:
        stop = min(start + size, n_blocks)
        nxt = start + size - overlap
        if stop == n_blocks:
            windows.append(Window(start, stop, tuple(range(start, stop))))
            return windows
        windows.append(Window(start, stop, tuple(range(start, nxt))))
        start = nxt
