"""Results table of a few-shot grid (datasets x shots x seeds): CSV, markdown and a W&B table.

``FewShotTable`` is a Hydra callback (the CLIP recipes list it under ``hydra.callbacks``): when a multirun
ends it reads every job's ``config.yaml`` and ``metrics.json`` under the sweep directory and writes

- ``results.csv``: one row per run (dataset, shots, seed, method, status, zero-shot and few-shot top-1, ...);
- ``results.md``: top-1 (%) mean ± std over seeds per dataset and shot count, with the zero-shot column
  and the average over the datasets (the 11-dataset average of CoOp / CLIP-LoRA on the full grid);
- a W&B run (offline unless the runs' logger says otherwise) holding both tables, when the runs log to W&B.

The same table for a sweep directory written earlier (or by SLURM jobs):
``python -m blocktrain.trainer.sweep multiruns/blocklora_clip/<date>``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from blocktrain.trainer.sources.class_names import BENCHMARK
from blocktrain.trainer.validation import PLUGIN_MARKER

COLUMNS = ("method", "dataset", "shots", "seed", "status", "acc", "zero_shot_acc", "trainable_params",
           "peak_mem_gb", "step_time_s", "model", "run_dir")


def collect_runs(sweep_dir: Path, metric: str = "val/acc") -> list[dict[str, Any]]:
    """One row per job folder under ``sweep_dir`` that holds both ``config.yaml`` and ``metrics.json``."""
    rows = []
    for metrics_path in sorted(Path(sweep_dir).rglob("metrics.json"), key=lambda p: _job_order(p.parent)):
        job = metrics_path.parent
        if not (job / "config.yaml").is_file():
            continue
        cfg = OmegaConf.load(job / "config.yaml")
        record = json.loads(metrics_path.read_text())
        values = record.get("metrics", {})
        plugins = [name for name, node in (OmegaConf.select(cfg, "plugin") or {}).items()
                   if node is not None and node.get(PLUGIN_MARKER) == name]
        rows.append({
            "method": "+".join(plugins) or str(OmegaConf.select(cfg, "name")),
            "dataset": str(OmegaConf.select(cfg, "data.dataset", default=None) or OmegaConf.select(cfg, "data.kind")),
            "shots": OmegaConf.select(cfg, "data.shots", default=None),
            "seed": OmegaConf.select(cfg, "seed"),
            "status": record.get("status"),
            "acc": values.get(metric),
            "zero_shot_acc": values.get("val/zero_shot_acc"),
            "trainable_params": values.get("params/trainable"),
            "peak_mem_gb": values.get("perf/peak_mem_gb"),
            "step_time_s": values.get("perf/step_time_s"),
            "model": str(OmegaConf.select(cfg, "model.id", default="")),
            "run_dir": str(job),
        })
    return rows


def _job_order(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, dataset and shot count: mean and std (over seeds) of the finished runs' top-1, in %; then
    per method and shot count the average over its datasets (only where every dataset has that shot count)."""
    groups: dict[tuple, list[float]] = {}
    zero_shot: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] != "finished" or r["acc"] is None:
            continue
        groups.setdefault((r["method"], r["dataset"], r["shots"]), []).append(100 * r["acc"])
        if r["zero_shot_acc"] is not None:
            zero_shot.setdefault((r["method"], r["dataset"]), []).append(100 * r["zero_shot_acc"])
    summary = []
    for (method, dataset, shots), accs in groups.items():
        mean, std = _mean_std(accs)
        summary.append({"method": method, "dataset": dataset, "shots": shots, "mean": mean, "std": std,
                        "seeds": len(accs), "zero_shot": _mean_std(zero_shot[(method, dataset)])[0]
                        if (method, dataset) in zero_shot else None})
    for method in sorted({s["method"] for s in summary}):
        mine = [s for s in summary if s["method"] == method]
        datasets = {s["dataset"] for s in mine}
        for shots in sorted({s["shots"] for s in mine}, key=_shot_key):
            cells = [s for s in mine if s["shots"] == shots]
            if len(cells) == len(datasets):
                zs = [s["zero_shot"] for s in cells if s["zero_shot"] is not None]
                summary.append({"method": method, "dataset": f"average ({len(datasets)} datasets)", "shots": shots,
                                "mean": sum(s["mean"] for s in cells) / len(cells), "std": None,
                                "seeds": min(s["seeds"] for s in cells),
                                "zero_shot": sum(zs) / len(zs) if len(zs) == len(cells) else None})
    return summary


def _shot_key(shots) -> tuple:
    return (0, shots) if isinstance(shots, (int, float)) else (1, str(shots))


def _dataset_key(name: str) -> tuple:
    if name.startswith("average"):
        return (2, 0, name)
    return (0, BENCHMARK.index(name), name) if name in BENCHMARK else (1, 0, name)


def markdown(summary: list[dict[str, Any]]) -> str:
    """One table per method: datasets as rows (the average last), zero-shot then one column per shot count."""
    lines = []
    for method in sorted({s["method"] for s in summary}):
        mine = [s for s in summary if s["method"] == method]
        shots = sorted({s["shots"] for s in mine}, key=_shot_key)
        lines += [f"### {method}: top-1 (%), mean ± std over seeds", "",
                  "| dataset | zero-shot | " + " | ".join(f"{k} shot{'s' if k != 1 else ''}" for k in shots) + " |",
                  "|---|---|" + "---|" * len(shots)]
        for dataset in sorted({s["dataset"] for s in mine}, key=_dataset_key):
            cells = {s["shots"]: s for s in mine if s["dataset"] == dataset}
            zs = next((s["zero_shot"] for s in cells.values() if s["zero_shot"] is not None), None)
            row = [f"**{dataset}**" if dataset.startswith("average") else dataset, _fmt(zs)]
            row += [_fmt(cells[k]["mean"], cells[k]["std"], cells[k]["seeds"]) if k in cells else "—" for k in shots]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(mean: float | None, std: float | None = None, seeds: int | None = None) -> str:
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:.1f}"
    if seeds == 1:
        return f"{mean:.1f} (1 seed)"
    return f"{mean:.1f} ± {std:.1f}" + (f" ({seeds} seeds)" if seeds != 3 else "")


def write_tables(sweep_dir: Path, metric: str = "val/acc", wandb_cfg: dict | None = None) -> list[Path]:
    """Write results.csv and results.md into ``sweep_dir`` (and the W&B tables when ``wandb_cfg`` is given)."""
    sweep_dir = Path(sweep_dir)
    rows = collect_runs(sweep_dir, metric)
    summary = summarize(rows)
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    failed = [r for r in rows if r["status"] != "finished"]
    note = f"\n{len(failed)} of {len(rows)} runs did not finish and are left out (see results.csv).\n" if failed else ""
    (sweep_dir / "results.md").write_text(f"# Few-shot results: {sweep_dir}\n\n{markdown(summary)}{note}")
    written = [sweep_dir / "results.csv", sweep_dir / "results.md"]
    if wandb_cfg is not None:
        _log_wandb(sweep_dir, rows, summary, wandb_cfg)
    return written


def _log_wandb(sweep_dir: Path, rows: list[dict], summary: list[dict], cfg: dict) -> None:
    import wandb

    mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or "offline"
    run = wandb.init(project=cfg.get("project", "blocktrain"), entity=cfg.get("entity"), group=cfg.get("group"),
                     name=f"{sweep_dir.parent.name}-{sweep_dir.name}-table", job_type="few-shot-table",
                     dir=str(sweep_dir), mode=mode, reinit="create_new")
    summary_columns = ["method", "dataset", "shots", "mean", "std", "seeds", "zero_shot"]
    run.log({"few_shot/runs": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows]),
             "few_shot/summary": wandb.Table(columns=summary_columns,
                                             data=[[s[c] for c in summary_columns] for s in summary])})
    run.finish()


class FewShotTable(Callback):
    """Hydra callback: the results tables of a multirun, written into its sweep directory when it ends."""

    def __init__(self, metric: str = "val/acc"):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        logger = OmegaConf.to_container(config.logger, resolve=True) if config.get("logger") else {}
        wandb_cfg = logger if logger.get("kind") == "wandb" else None
        for path in write_tables(sweep_dir, self.metric, wandb_cfg):
            print(f"few-shot results: {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Results tables (CSV, markdown, W&B) of a few-shot sweep directory")
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default="val/acc")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to a W&B run (offline by default)")
    args = parser.parse_args(argv)
    for path in write_tables(Path(args.sweep_dir), args.metric, {} if args.wandb else None):
        print(path)


if __name__ == "__main__":
    main()
