"""The few-shot grid's results tables, from run folders as `train` writes them (config.yaml + metrics.json)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from blocktrain.trainer.sweep import collect_runs, main, summarize, write_tables

ACC = {("flowers102", 1): [0.70, 0.72, 0.74], ("flowers102", 16): [0.97, 0.98, 0.99],
       ("dtd", 1): [0.50, 0.54, 0.52], ("dtd", 16): [0.70, 0.72, 0.74], ("eurosat", 1): [0.60, 0.62, 0.64]}


def write_job(job: Path, dataset: str, shots: int, seed: int, acc: float | None, status: str = "finished") -> None:
    job.mkdir(parents=True)
    cfg = {"name": "blocklora_clip", "seed": seed, "data": {"kind": "few_shot", "dataset": dataset, "shots": shots},
           "model": {"id": "openai/clip-vit-base-patch16"}, "plugin": {"blocklora": {"_plugin_": "blocklora"},
                                                                       "lora": {"rank": 8}}}
    (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    metrics = {"params/trainable": 103680, "val/zero_shot_acc": 0.5}
    if acc is not None:
        metrics["val/acc"] = acc
    (job / "metrics.json").write_text(json.dumps({"status": status, "metrics": metrics}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    n = 0
    for (dataset, shots), accs in ACC.items():
        for seed, acc in enumerate(accs, 1):
            write_job(tmp_path / str(n), dataset, shots, seed, acc)
            n += 1
    write_job(tmp_path / str(n), "dtd", 16, 4, None, status="failed")
    return tmp_path


def test_summary_means_over_seeds_and_averages_only_complete_columns(sweep):
    write_tables(sweep)
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {r["method"] for r in rows} == {"blocklora"}  # lora is configured, not selected
    summary = {(s["dataset"], s["shots"]): s for s in summarize(collect_runs(sweep))}
    assert summary[("flowers102", 16)]["mean"] == pytest.approx(98.0)
    assert summary[("flowers102", 16)]["std"] == pytest.approx(1.0)
    assert summary[("dtd", 16)]["seeds"] == 3  # the failed fourth run is left out
    assert summary[("average (3 datasets)", 1)]["mean"] == pytest.approx((72 + 52 + 62) / 3)
    assert ("average (3 datasets)", 16) not in summary  # eurosat has no 16-shot runs
    table = (sweep / "results.md").read_text()
    assert "| flowers102 | 50.0 | 72.0 ± 2.0 | 98.0 ± 1.0 |" in table
    assert "| **average (3 datasets)** | 50.0 | 62.0 | — |" in table
    assert table.index("| flowers102") < table.index("| dtd") < table.index("| eurosat")  # the benchmark's order
    assert "1 of 16 runs did not finish" in table


def test_command_line_rebuilds_the_tables(sweep, capsys):
    main([str(sweep)])
    assert (sweep / "results.md").is_file() and str(sweep / "results.csv") in capsys.readouterr().out
