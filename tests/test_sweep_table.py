"""The multirun results table: rows over the keys a sweep varies, mean ± sd over seeds, for any recipe."""
from __future__ import annotations

import csv
import json
import random
import statistics
from itertools import product
from pathlib import Path

import pytest
import wandb
from omegaconf import OmegaConf

from blocktrain.trainer.sweep import collect_runs, summarize, varying_keys, write_tables
from tests.helpers import read_metrics, train, wandb_history

RANKS, LRS, SEEDS = (8, 4), (1e-3, 1e-4), (0, 1, 2)


def write_job(job: Path, rank: int, lr: float, seed: int, metrics: dict, optim: str = "adamw",
              overrides: list[str] | None = None) -> None:
    job.mkdir(parents=True)
    cfg = {"name": "lora_text_classifier", "seed": seed, "optimized_metric": "val/acc", "run_dir": f"runs/{job.name}",
           "data": {"batch_size": 8}, "optim": {"kind": optim, "lr": lr}, "plugin": {"lora": {"rank": rank}},
           "trainer": {"max_steps": 10 * rank}}  # derived from the rank: a config key, but not an override
    (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (job / "metrics.json").write_text(json.dumps({"status": "finished", "metrics": metrics}))
    if overrides is not None:
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))


@pytest.fixture
def grid(tmp_path) -> dict:
    """A rank x lr x seed sweep (config.yaml + metrics.json per job, no overrides files); its accuracies."""
    rng, accs = random.Random(0), {}
    for n, (rank, lr, seed) in enumerate(product(RANKS, LRS, SEEDS)):
        acc = rng.uniform(0.5, 0.9)
        accs.setdefault((rank, lr), []).append(acc)
        write_job(tmp_path / str(n), rank, lr, seed, {"val/acc": acc, "train/loss": 1 - acc})
    return accs


def test_rows_are_the_varied_keys_with_mean_and_sd_over_seeds(grid, tmp_path):
    runs = collect_runs(tmp_path)
    keys = varying_keys(runs)
    assert keys == ["optim.lr", "plugin.lora.rank", "trainer.max_steps"]  # not seed, run_dir or data.batch_size
    summary = summarize(runs, keys, ["val/acc"])
    assert [(row["plugin.lora.rank"], row["optim.lr"]) for row in summary] == [(4, 1e-4), (8, 1e-4), (4, 1e-3),
                                                                               (8, 1e-3)]  # numbers ascending
    for row in summary:
        accs = grid[(row["plugin.lora.rank"], row["optim.lr"])]
        assert row["n"] == 3
        assert row["val/acc"] == pytest.approx(statistics.mean(accs))
        assert row["val/acc sd"] == pytest.approx(statistics.stdev(accs))

    write_tables(tmp_path)  # the metric: the recipe's optimized_metric
    table = (tmp_path / "results.md").read_text()
    assert "| optim.lr | plugin.lora.rank | trainer.max_steps | val/acc | n |" in table
    accs = grid[(8, 1e-3)]
    assert f"| 0.001 | 8 | 80 | {statistics.mean(accs):.4g} ± {statistics.stdev(accs):.2g} | 3 |" in table
    assert "batch_size" not in table and "train/loss" not in table and "did not finish" not in table
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == ["job", "status", "seed", *keys, "val/acc", "train/loss"]
    assert float(rows[4]["val/acc"]) == grid[(8, 1e-4)][1] and rows[4]["seed"] == "1"


def test_overrides_give_the_keys_and_group_choices_their_names(tmp_path):
    accs = {}
    for n, (optim, rank, seed) in enumerate(product(("sgd", "adamw"), RANKS, (0, 1))):
        accs.setdefault((optim, rank), []).append(0.5 + 0.1 * n)
        write_job(tmp_path / str(n), rank, 1e-3, seed, {"val/acc": 0.5 + 0.1 * n}, optim=optim,
                  overrides=["recipe=lora_text_classifier", "trainer=cpu", f"optim={optim}",
                             f"plugin.lora.rank={rank}", f"seed={seed}"])
    summary = summarize(runs := collect_runs(tmp_path), keys := varying_keys(runs), ["val/acc"])
    assert keys == ["optim", "plugin.lora.rank"]  # trainer.max_steps follows the rank but was not swept
    assert [(row["optim"], row["plugin.lora.rank"], row["n"]) for row in summary] == [
        ("sgd", 4, 2), ("sgd", 8, 2), ("adamw", 4, 2), ("adamw", 8, 2)]  # names in the order the sweep ran them
    assert summary[0]["val/acc"] == pytest.approx(statistics.mean(accs[("sgd", 4)]))


def test_average_over_a_key_only_where_every_value_has_the_row(grid, tmp_path):
    for job in (2, 9, 10, 11):  # one seed of rank 8 at lr 1e-3, and every run of rank 4 at lr 1e-4, failed
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps({"status": "failed", "metrics": {}}))
    summary = summarize(collect_runs(tmp_path), ["optim.lr", "plugin.lora.rank"], ["val/acc"],
                        average_over="plugin.lora.rank")
    averages = [row for row in summary if row["plugin.lora.rank"] == "average (2)"]
    means = {(row["plugin.lora.rank"], row["optim.lr"]): row for row in summary}
    assert [row["optim.lr"] for row in averages] == [1e-3] and summary[-1] == averages[0]  # no (4, 1e-4) row
    assert means[(8, 1e-3)]["val/acc"] == pytest.approx(statistics.mean(grid[(8, 1e-3)][:2]))
    assert averages[0]["val/acc"] == pytest.approx((means[(4, 1e-3)]["val/acc"] + means[(8, 1e-3)]["val/acc"]) / 2)
    assert averages[0]["n"] == 2 and averages[0]["val/acc sd"] is None

    # the same through write_tables, with the rank's twin trainer.max_steps excluded; W&B takes the mixed column
    write_tables(tmp_path, average_over="plugin.lora.rank", exclude=["run_dir", "trainer.max_steps"],
                 wandb_cfg={"mode": "offline"})
    wandb.teardown()  # the W&B service writes the run file in the background: let it finish
    assert f"| 0.001 | **average (2)** | {averages[0]['val/acc']:.4g} | 2 |" in (tmp_path / "results.md").read_text()
    logged = [row for row in wandb_history(tmp_path) if row.get("sweep/summary/_type") == "table-file"]
    assert logged[0]["sweep/runs/nrows"] == 12 and logged[0]["sweep/summary/nrows"] == 3 + 1


def test_every_recipes_multirun_writes_the_table(lora_args, tmp_path):
    args = [a for a in lora_args if not a.startswith(("run_dir=", "optim.lr="))]
    sweep = tmp_path / "sweep"
    result = train("-m", *args, "trainer.max_steps=2", "optim.lr=1e-3,3e-3", "stages=[fit,evaluate]", "logger=none",
                   f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    table = (sweep / "results.md").read_text()
    assert "| optim.lr | val/acc | n |" in table
    for job, lr in (("0", "0.001"), ("1", "0.003")):
        assert f"| {lr} | {read_metrics(sweep / job)['metrics']['val/acc']:.4g} | 1 |" in table
