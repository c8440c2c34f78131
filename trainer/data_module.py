"""The run's LightningDataModule: batching, DDP sharding and a resumable sample order."""
from __future__ import annotations

import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled order per epoch from (seed, epoch), sharded over ranks, able to skip what was consumed.

    Rank r takes every world-th index of the epoch's permutation, so a global batch of B·world samples
    is the same set whatever the number of processes. ``skip`` samples are dropped once, on resume, from the
    first epoch iterated if it is ``skip_epoch`` (None = any): the loader may be built before Lightning restores
    the epoch counter, which sets the epoch before iterating. The length stays the whole epoch's, because
    Lightning's restored batch counter already counts the skipped ones.

    ``repeats`` > 1 is repeated augmentation (DeiT's ``RASampler``): each index of the permutation appears
    ``repeats`` times in a row, so its copies go to consecutive ranks (with one process, into the same
    batch) and each gets its own random augmentation; the epoch keeps the split's length, so it sees about
    1/``repeats`` of the distinct samples. The order is still a function of (seed, epoch), so a resume is exact.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 repeats: int = 1):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world, self.repeats = rank, world, repeats
        self.epoch, self.skip, self.skip_epoch = 0, 0, None

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        order = order.repeat_interleave(self.repeats)[:self.size].tolist()
        usable = self.size - self.size % (self.batch_size * self.world)  # drop_last over the global batch
        return order[:usable][self.rank :: self.world]

    def __iter__(self):
        indices = self._indices()
        if self.skip_epoch in (None, self.epoch) and self.skip < len(indices):  # a position saved after an epoch's
            indices = indices[self.skip:]  # last batch: Lightning moves on (an empty epoch would end the fit)
        self.skip, self.skip_epoch = 0, None
        return iter(indices)

    def __len__(self) -> int:
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start."""
        self.epoch = epoch


class RunDataModule(pl.LightningDataModule):
    """Wraps the source's datasets; its state (epoch, batches consumed) goes into every checkpoint."""

    def __init__(self, datasets, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int,
                 repeats: int = 1):
        super().__init__()
        self.repeats = repeats  # repeated augmentation: copies of each sampled training item (ResumableSampler)
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
        sampler = ResumableSampler(len(train), self.batch_size, self.seed, True, rank, world, self.repeats)
        sampler.epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._resume_position:
            sampler.skip = self._resume_position["batches"] * self.batch_size
            sampler.skip_epoch = self._resume_position["epoch"]
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
