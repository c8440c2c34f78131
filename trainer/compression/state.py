"""A calibrate loop's resumable state: saved under ``run_dir/state/NAME.pt``, loaded by ``resume=auto``.

The state is written every ``save_every_s`` seconds, at the end, and when Ctrl-C (SIGINT) or SIGTERM
stops the loop: the signal is held until the current step completes, so the saved state is always
consistent; a second Ctrl-C stops at once (the last periodic save is kept).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from blocktrain.trainer.errors import UserError

__all__ = ["ResumableState"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ResumableState:
    """State of plugin ``name``'s calibrate loop, tied to the ``config`` it was made with.

    On resume, a saved state made with a different config is refused, except for the keys in ``free``
    (e.g. ``epochs``: a finished iCBS run resumed with more epochs goes on).
    """

    def __init__(self, run, name: str, config: dict, save_every_s: float, free: tuple[str, ...] = ()):
        self.run, self.name, self.save_every_s = run, name, save_every_s
        self.config = {k: v for k, v in config.items() if k not in free}
        self._stop = False
        self._last_save = time.monotonic()

    def load(self) -> Any | None:
        """The payload saved by an earlier run of this run dir (only when resuming), else None."""
        if not self.run.resuming:
            return None
        saved = self.run.load_state(self.name)
        if saved is None:
            print(f"{self.name}: no saved calibrate state in {self.run.state_dir}; starting from the beginning",
                  file=sys.stderr)
            return None
        changed = sorted(k for k in set(saved["config"]) | set(self.config) if saved["config"].get(k) != self.config.get(k))
        if changed:
            key = changed[0]
            raise UserError(f"cannot resume {self.name}: the saved state was made with plugin.{self.name}.{key}="
                            f"{saved['config'].get(key)!r}, this run has {self.config.get(key)!r}; use the same "
                            "settings, or start a new run_dir")
        return saved["payload"]

    def save(self, payload: Any) -> None:
        self.run.save_state(self.name, {"config": self.config, "payload": payload})
        self._last_save = time.monotonic()

    @contextmanager
    def steps(self, total: int, description: str, snapshot: Callable[[], Any]) -> Iterator[Callable[[], None]]:
        """Yields ``step_done()``, to call after each completed step: it advances the progress bar (``total``
        steps), saves ``snapshot()`` every ``save_every_s`` seconds, and after a Ctrl-C saves and raises
        ``KeyboardInterrupt`` (which the engine turns into a "resume=auto" message)."""
        ticks = iter(self.run.progress(range(total), total=total, description=description))
        next(ticks, None)

        def step_done() -> None:
            next(ticks, None)
            if self._stop:
                self.save(snapshot())
                raise KeyboardInterrupt
            if time.monotonic() - self._last_save >= self.save_every_s:
                self.save(snapshot())

        with self._held_signals():
            try:
                yield step_done
            finally:
                ticks.close()
            if self._stop:  # the signal came after the last step
                self.save(snapshot())
                raise KeyboardInterrupt

    @contextmanager
    def _held_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            print(f"\n{self.name}: stopping after the current step and saving its state "
                  "(press Ctrl-C again to stop now)", file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in _SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
