"""Unit checks of engine pieces: optimiser presets, LR schedules, sampler sharding, atomic checkpoints."""
from __future__ import annotations

import math
from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from blocktrain.trainer.checkpoint import AtomicCheckpointIO
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.data_module import ResumableSampler
from blocktrain.trainer.optim import build_optimizer, build_scheduler, lr_lambda

OPTIM_DIR = resources.files("blocktrain.conf").joinpath("optim")


@pytest.mark.parametrize("preset", ["adamw", "sgd", "adamw8bit", "paged_adamw8bit"])
def test_optimizer_presets_build_and_descend(preset):
    cfg = OmegaConf.create(OPTIM_DIR.joinpath(f"{preset}.yaml").read_text())
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # bitsandbytes quantizes states of tensors >= 4096 elements
    optimizer = build_optimizer(cfg, [weight])
    assert type(optimizer).__name__.lower().replace("_", "") == cfg._target_.split(".")[-1].lower()
    losses = []
    for _ in range(5):
        loss = (weight ** 2).sum()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


def test_lr_schedules():
    cos = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.1)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.1 + 0.9 * 0.5) and cos(110) == pytest.approx(0.1)
    lin = lr_lambda("linear", warmup=0, total=100, min_ratio=0.0)
    assert lin(25) == pytest.approx(0.75) and lin(100) == pytest.approx(0.0)
    assert lr_lambda("constant", warmup=0, total=100, min_ratio=0.0)(77) == 1.0
    assert math.isclose(lr_lambda("cosine", 0, 100, 0.0)(500), 0.0, abs_tol=1e-12)


def test_warmup_in_epochs_counts_the_steps_of_an_epoch():
    def lrs(cfg, per_epoch):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(OmegaConf.create({"kind": "cosine", "min_lr": 0.0, **cfg}), opt, 100, per_epoch)
        return [sched.lr_lambdas[0](s) for s in range(100)]

    assert lrs({"warmup_steps": 0, "warmup_epochs": 2.5}, 4) == lrs({"warmup_steps": 10}, None)
    with pytest.raises(UserError, match="warmup_epochs=1 needs a value >= 0 and scheduler.warmup_steps=0 \\(got 5\\)"):
        lrs({"warmup_steps": 5, "warmup_epochs": 1}, 4)
    with pytest.raises(UserError, match="warmup_epochs needs a loop over epochs"):
        lrs({"warmup_steps": 0, "warmup_epochs": 1}, None)


def test_sampler_gives_the_same_global_batches_for_any_world_size():
    one = list(ResumableSampler(50, batch_size=8, seed=3))
    ranks = [list(ResumableSampler(50, batch_size=4, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(one) == 48 and len(ranks[0]) == len(ranks[1]) == 24
    for step in range(6):
        global_batch = set(one[step * 8:(step + 1) * 8])
        assert global_batch == set(ranks[0][step * 4:(step + 1) * 4]) | set(ranks[1][step * 4:(step + 1) * 4])


def test_sampler_skips_once_and_reshuffles_per_epoch():
    sampler = ResumableSampler(20, batch_size=4, seed=0)
    full = list(sampler)
    sampler.skip = 8
    assert len(sampler) == 20  # the epoch's length: Lightning's restored batch counter includes the skipped ones
    assert list(sampler) == full[8:]
    assert list(sampler) == full
    sampler.set_epoch(1)
    assert sorted(sampler) == sorted(full) and list(sampler) != full
    epoch1 = list(sampler)
    sampler.set_epoch(0)  # a loader built before Lightning restores the epoch counter: the skip waits for epoch 1
    sampler.skip, sampler.skip_epoch = 8, 1
    sampler.set_epoch(1)
    assert list(sampler) == epoch1[8:] and list(sampler) == epoch1
    sampler.skip, sampler.skip_epoch = 8, 1  # saved in epoch 1, resumed into epoch 2: nothing to skip there
    sampler.set_epoch(2)
    assert len(list(sampler)) == 20
    sampler.skip, sampler.skip_epoch = 20, 2  # saved after the epoch's last batch
    assert len(list(sampler)) == 20


def test_repeated_augmentation_sampler_repeats_in_a_row_and_resumes_exactly():
    plain = list(ResumableSampler(20, batch_size=4, seed=0))
    sampler = ResumableSampler(20, batch_size=4, seed=0, repeats=3)
    full = list(sampler)
    assert len(full) == len(sampler) == 20  # an epoch keeps the split's length
    assert full == [i for i in plain[:7] for _ in range(3)][:20]  # the same permutation, each index 3 times in a row
    sampler.skip = 8
    assert list(sampler) == full[8:] and list(sampler) == full
    ranks = [list(ResumableSampler(20, batch_size=2, seed=0, rank=r, world=2, repeats=3)) for r in range(2)]
    assert [i for pair in zip(*ranks) for i in pair] == full  # copies of an index go to consecutive ranks
    sampler.set_epoch(1)
    assert list(sampler) != full and sorted(set(sampler)) != list(range(20))


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("preset", sorted(p.name[:-5] for p in resources.files("blocktrain.conf").joinpath("trainer")
                                          .iterdir() if p.name.endswith(".yaml")))
def test_trainer_presets_are_lightning_arguments(preset):
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.run import trainer_kwargs

    kwargs = trainer_kwargs(load_config([f"trainer={preset}"]))
    assert {"accelerator", "devices", "strategy", "precision", "max_steps"} <= set(kwargs)
    expected = {"ddp": "ddp", "fsdp": "fsdp"}.get(preset, "auto")
    assert kwargs["strategy"] == expected


def test_unknown_trainer_key_lists_lightning_arguments():
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.run import trainer_kwargs

    with pytest.raises(UserError, match="unknown key 'max_stepz' in trainer. Valid keys: .*max_steps"):
        trainer_kwargs(load_config(["+trainer.max_stepz=3"]))
