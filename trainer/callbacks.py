"""Engine callbacks: throughput and memory, data position for resume, checkpoint on Ctrl-C."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
import pytorch_lightning as pl


def peak_memory_gb() -> float:
    """Peak accelerator memory if on CUDA, else the process's peak resident set size, in GiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


class RunStats(pl.Callback):
    """Logs step time, samples/s, tokens/s (where batches carry tokens) and peak memory."""

    def __init__(self, task):
        self.task = task
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.global_step % trainer.log_every_n_steps) != 0 and trainer.global_step > 1:
            return
        dt = max(time.perf_counter() - self._start, 1e-9)
        world = trainer.world_size
        values = {"perf/step_time_s": dt, "perf/samples_per_s": self.task.batch_size(batch) * world / dt,
                  "perf/peak_mem_gb": peak_memory_gb()}
        tokens = self.task.num_tokens(batch)
        if tokens is not None:
            values["perf/tokens_per_s"] = tokens * world / dt
        pl_module.log_dict(values, on_step=True, on_epoch=False)


class DataPositionCallback(pl.Callback):
    """Counts the training batches finished in the current epoch (runs before ModelCheckpoint)."""

    def on_train_epoch_start(self, trainer, pl_module):
        dm = trainer.datamodule
        if dm.position["epoch"] != trainer.current_epoch:
            dm.position = {"epoch": trainer.current_epoch, "batches": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.datamodule.position["batches"] += 1


class LastCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` when fit ends and on Ctrl-C, so ``resume=auto`` continues from the last step."""

    def __init__(self, path: Path):
        self.path = path
        self.saved_on_interrupt = False

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            self.saved_on_interrupt = True
            print(f"\ninterrupted at step {trainer.global_step}; checkpoint written to {self.path}", file=sys.stderr)
