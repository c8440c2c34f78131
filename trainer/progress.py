"""Progress bars for long loops that run outside Lightning's fit loop (calibrate, evaluate, sample)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """A rich progress bar on a terminal; elsewhere a log line every ~10% so CI logs stay short."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in iterable:
                yield item
                bar.advance(task)
        return
    start, every = time.perf_counter(), max(1, (total or 10) // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if i % every == 0 or i == total:
            of = f"/{total}" if total else ""
            print(f"{description}: {i}{of} ({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)
