"""The few-shot grid's results tables (the sweep table with the CLIP recipes' options), from run folders as `train`
writes them (config.yaml + metrics.json)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from blocktrain.trainer.sweep import main, write_tables

CLIP = {"metrics": ["val/acc", "val/zero_shot_acc"], "average_over": "data.dataset"}  # the CLIP recipes'

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
    recipe = OmegaConf.load(Path(__file__).parents[2] / "recipes" / "blocklora_clip.yaml")
    options = OmegaConf.to_container(recipe.hydra.callbacks.results_table)
    assert options == CLIP
    write_tables(sweep, **options)
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and list(rows[0])[:5] == ["job", "status", "seed", "data.dataset", "data.shots"]
    assert rows[0]["val/acc"] == "0.7" and rows[-1]["status"] == "failed"
    table = (sweep / "results.md").read_text()
    assert "| data.dataset | data.shots | val/acc | val/zero_shot_acc | n |" in table  # lora.rank does not vary
    assert "| flowers102 | 16 | 0.98 ± 0.01 | 0.5 ± 0 | 3 |" in table
    assert "| dtd | 16 | 0.72 ± 0.02 | 0.5 ± 0 | 3 |" in table  # the failed fourth run is left out
    assert f"| **average (3)** | 1 | {(0.72 + 0.52 + 0.62) / 3:.4g} | 0.5 | 3 |" in table
    assert "| **average (3)** | 16 |" not in table  # eurosat has no 16-shot runs
    assert table.index("| flowers102 | 1 ") < table.index("| flowers102 | 16") < table.index("| dtd | 1 ") \
        < table.index("| eurosat") < table.index("| **average")  # the sweep's order, the average last
    assert "1 of 16 runs did not finish or lack a metric" in table


def test_command_line_rebuilds_the_tables(sweep, capsys):
    main([str(sweep), "--metric", "val/acc", "--average-over", "data.dataset"])
    assert str(sweep / "results.csv") in capsys.readouterr().out
    assert "| **average (3)** | 1 | 0.62 | 3 |" in (sweep / "results.md").read_text()
