"""The CLIP few-shot recipes end to end through the `train` CLI, offline: a tiny random CLIPModel learns a
synthetic colour-naming task (an image folder written here) with Block-LoRA; a tiny grid writes its tables; the
offline demo builds its model on first use and names both ways to Fashion-MNIST when it has none."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from blocktrain.trainer import cli
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.run import RunInterrupted, run
from blocktrain.trainer.clip import few_shot, tiny_clip
from blocktrain.trainer.sources.models import load_processor
from blocktrain.trainer.clip.tiny_clip import save_tiny_clip
from blocktrain.trainer.clip.task import ZeroShotEvaluation
from tests.helpers import interrupt_at, read_metrics, train, wandb_history
from tests.clip.test_few_shot import offline_download, write_gzipped_fashion_mnist

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the tiny model gains nothing from two, which stall on busy shared cores


def write_colour_folder(root: Path, per_class: dict[str, int], seed: int) -> None:
    """root/<split>/<colour>/i.png: noisy images of one colour per class (learnable from any crop)."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data root holding the 'colours' and 'tints' datasets, tiny CLIP dir)."""
    root = tmp_path_factory.mktemp("clip_data")
    write_colour_folder(root / "colours", {"train": 8, "test": 10}, seed=0)
    write_colour_folder(root / "tints", {"train": 4, "test": 6}, seed=1)
    model = save_tiny_clip(root / "tiny_clip", list(COLOURS), ["a photo of a {}."], image_size=32, patch_size=8,
                           width=32, layers=2, heads=2, projection_dim=16)
    return root, model


def test_blocklora_clip_learns_few_shot_through_the_cli(colour_data, tmp_path):
    root, model = colour_data
    run_dir = tmp_path / "run"
    result = train("recipe=blocklora_clip_demo", f"model.id={model}", "data.dataset=colours", f"data.root={root}",
                   "data.shots=8", "data.steps_per_shot=8", f"run_dir={run_dir}", "logger=csv",
                   "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", **ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "finished" and metrics["optimized_metric"] == "val/acc"
    values = metrics["metrics"]
    assert values["val/zero_shot_acc"] <= 0.5  # a random CLIP: chance is 0.25
    assert values["val/acc"] >= 0.9 and values["val/acc"] == metrics["optimized_value"]
    with open(run_dir / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 64  # trainer.max_steps = ${data_info:train_steps} = 8 steps/shot x 8 shots
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.trainer.max_steps == 64 and config.plugin.blocklora.n_blocks == 8
    assert values["params/trainable"] < 0.05 * values["params/total"]
    assert (run_dir / "export" / "blocklora" / "adapter").is_dir()
    assert (run_dir / "export" / "blocklora" / "merged" / "model.safetensors").is_file()


def test_demo_builds_its_tiny_clip_on_first_use_and_reuses_it(tmp_path, monkeypatch):
    fashion = write_gzipped_fashion_mnist(tmp_path / "fashion-mnist", n_train=20, n_test=10)
    model = tmp_path / "cache" / "tiny-clip"
    run_dir = tmp_path / "run"
    result = train("recipe=blocklora_clip_demo", f"model.id={model}", f"data.path={fashion}", "data.shots=2",
                   "data.steps_per_shot=2", f"run_dir={run_dir}", "logger=none", "trainer.enable_progress_bar=false",
                   **ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"built the demo's tiny random CLIPModel (not pretrained: a pipeline demo) at {model}" in result.stderr
    assert read_metrics(run_dir)["status"] == "finished"
    assert sorted(p.name for p in model.parent.iterdir()) == ["tiny-clip"]  # renamed into place, no temp left
    built = (model / "model.safetensors").stat().st_mtime_ns
    # the second time the cached model is used as it is
    monkeypatch.setattr(tiny_clip, "save_tiny_clip", lambda *a, **k: pytest.fail("rebuilt the cached tiny CLIP"))
    load_processor({"kind": "tiny_clip", "id": str(model)})
    assert (model / "model.safetensors").stat().st_mtime_ns == built


def test_tiny_clip_build_is_atomic(tmp_path, monkeypatch):
    def crash(out, *args, **kwargs):
        (Path(out) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(tiny_clip, "save_tiny_clip", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny_clip.build_once(tmp_path / "cache" / "tiny", ["a"], ["{}"])
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written model, no temp folder
    (tmp_path / "cache" / "tiny").mkdir()
    assert tiny_clip.build_once(tmp_path / "cache" / "tiny", ["a"], ["{}"]) is False  # there already: kept


def test_demo_without_fashion_mnist_is_one_clear_error_naming_both_ways(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(few_shot, "FASHION_MNIST_DIR", str(tmp_path / "no-debian-package"))
    monkeypatch.setattr(FashionMNIST, "download", offline_download)  # as without network
    monkeypatch.setattr("sys.argv", ["train"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["recipe=blocklora_clip_demo", f"model.id={tmp_path / 'tiny-clip'}", f"data.root={tmp_path / 'data'}",
                  f"run_dir={tmp_path / 'run'}", "logger=none"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: Fashion-MNIST not found (the download failed: Error downloading train-images-idx3-ubyte.gz: Tried "
        "http://mirror/, got: <urlopen error [Errno -2] Name or service not known>). Either install Debian's package, "
        f"offline: `apt-get install -y dataset-fashion-mnist` (idx files in {tmp_path / 'no-debian-package'}), or let "
        f"torchvision download it where the network allows: data.download=true (into {tmp_path}/data/FashionMNIST/raw)")


def test_grid_multirun_writes_csv_markdown_and_a_wandb_table(colour_data, tmp_path):
    root, model = colour_data
    sweep = tmp_path / "sweep"
    result = train("-m", "recipe=lora_clip", "trainer=cpu", "trainer.precision=32-true", f"model.id={model}",
                   f"data.root={root}", "data.image_size=32", "data.dataset=colours,tints", "data.shots=1,2", "seed=0",
                   "data.steps_per_shot=6", "optim.lr=1e-2", "data.num_workers=0", "trainer.enable_progress_bar=false",
                   "checkpoint.every_n_steps=100", "stages=[fit]", f"hydra.sweep.dir={sweep}", **ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["data.dataset"], r["data.shots"]) for r in rows) == [("colours", "1"), ("colours", "2"),
                                                                          ("tints", "1"), ("tints", "2")]
    assert all(r["status"] == "finished" and 0 <= float(r["val/acc"]) <= 1 for r in rows)
    table = (sweep / "results.md").read_text()
    assert "| data.dataset | data.shots | val/acc | val/zero_shot_acc | n |" in table  # the swept keys only
    assert "| colours | 1 |" in table and "| tints | 2 |" in table
    mean = np.mean([float(r["val/acc"]) for r in rows if r["data.shots"] == "1"])
    average_row = next(line for line in table.splitlines() if line.startswith("| **average (2)** | 1 |"))
    assert f"{mean:.4g}" == average_row.split("|")[3].strip()  # columns: dataset, shots, acc, zero-shot acc, n
    logged = [row for row in wandb_history(sweep) if row.get("sweep/runs/_type") == "table-file"]
    assert logged and logged[0]["sweep/runs/nrows"] == 4 and logged[0]["sweep/summary/nrows"] == 4 + 2


def test_resume_restores_the_zero_shot_accuracy_instead_of_measuring_trained_weights(colour_data, tmp_path,
                                                                                      monkeypatch):
    root, model = colour_data
    run_dir = tmp_path / "run"
    args = ["recipe=blocklora_clip_demo", f"model.id={model}", "data.dataset=colours", f"data.root={root}",
            "data.shots=4", "data.steps_per_shot=2", f"run_dir={run_dir}", "logger=none",
            "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2"]
    with pytest.raises(RunInterrupted):
        run(load_config(args), extra_callbacks=[interrupt_at(3)])
    zero_shot = read_metrics(run_dir)["metrics"]["val/zero_shot_acc"]
    monkeypatch.setattr(ZeroShotEvaluation, "_evaluate", lambda *a: pytest.fail("zero-shot evaluation on resume"))
    run(load_config([*args, "resume=auto"]))
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "finished"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert metrics["metrics"]["val/zero_shot_acc"] == zero_shot and "val/acc" in metrics["metrics"]
