"""Unit checks of engine pieces: optimiser presets, LR schedules, sampler sharding, atomic checkpoints."""
from __future__ import annotations

import math
from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from blocktrain.trainer.checkpoint import AtomicCheckpointIO
from blocktrain.trainer.data_module import ResumableSampler
from blocktrain.trainer.optim import build_optimizer, lr_lambda

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
    from blocktrain.trainer.errors import UserError
    from blocktrain.trainer.run import trainer_kwargs

    with pytest.raises(UserError, match="unknown key 'max_stepz' in trainer. Valid keys: .*max_steps"):
        trainer_kwargs(load_config(["+trainer.max_stepz=3"]))
