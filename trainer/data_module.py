"""The run's LightningDataModule: batching, DDP sharding and a resumable sample order."""
from __future__ import annotations

import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled order per epoch from (seed, epoch), sharded over ranks, able to skip what was consumed.

    Rank r takes every world-th index of the epoch's permutation, so a global batch of B·world samples
    is the same set whatever the number of processes. ``skip`` samples are dropped once, on resume; the
    length stays the whole epoch's, because Lightning's restored batch counter already counts them.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        usable = self.size - self.size % (self.batch_size * self.world)  # drop_last over the global batch
        return order[:usable][self.rank :: self.world]

    def __iter__(self):
        indices = self._indices()[self.skip :]
        self.skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start."""
        self.epoch = epoch


class RunDataModule(pl.LightningDataModule):
    """Wraps the source's datasets; its state (epoch, batches consumed) goes into every checkpoint."""

    def __init__(self, datasets, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int):
        super().__init__()
        self.datasets = datasets
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.position = {"epoch": 0, "batches": 0}  # kept current by DataPositionCallback
        self._resume_position: dict | None = None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset, batch_size: int, sampler) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.datasets.collate_fn,
                          num_workers=self.num_workers, drop_last=False, persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        train = self.datasets.train
        if len(train) < self.batch_size * world:
            from blocktrain.trainer.errors import UserError

            raise UserError(f"the training set has {len(train)} samples, fewer than one global batch "
                            f"({self.batch_size} x {world} processes); lower data.batch_size")
        sampler = ResumableSampler(len(train), self.batch_size, self.seed, True, rank, world)
        sampler.epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._resume_position and self._resume_position["epoch"] == sampler.epoch:
            sampler.skip = self._resume_position["batches"] * self.batch_size
            if sampler.skip >= len(sampler._indices()):  # saved after the epoch's last batch: Lightning moves on
                sampler.skip = 0  # (an empty loader would end the fit with "No training batches")
            self.position = dict(self._resume_position)
        self._resume_position = None
        return self._loader(train, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.datasets.val is None:
            return []
        rank, world = self._world()
        val = self.datasets.val
        return self._loader(val, self.eval_batch_size, list(range(rank, len(val), world)))

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self._resume_position = dict(state)
