"""Results table of a multirun: mean ± sd over seeds for every combination of the keys the sweep varies.

``SweepTable`` is a Hydra callback that ``conf/config.yaml`` registers for every recipe: when a multirun ends
it reads every job's ``config.yaml`` and ``metrics.json`` under the sweep directory and writes

- ``results.csv``: one row per run (job folder, status, seed, the varied keys, every metric it logged);
- ``results.md``: one row per combination of the varied keys, the metrics as mean ± sd over the finished
  runs (seeds), and n, the number of those runs;
- a W&B run (offline unless the runs' logger says otherwise) holding both tables, when the runs log to W&B.

The varied keys are the Hydra overrides (``.hydra/overrides.yaml``) whose values differ between jobs, or,
when a job has no overrides file, the resolved config keys that differ; the seed and ``exclude`` keys
(``run_dir``) are never keys. Numeric values are listed ascending, others in the order the sweep ran them.
The metrics are ``metrics`` or else the recipe's ``optimized_metric``. ``average_over: KEY`` adds, for each
combination of the other keys that every value of KEY has, a row of the means averaged over KEY (the
dataset average of a few-shot grid).

The same table for a sweep directory written earlier (or by SLURM jobs):
``python -m blocktrain.trainer.sweep multiruns/<recipe>/<date> [--metric M ...] [--average-over KEY]``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SEED = "seed"


@dataclass
class Run:
    """One job of the sweep: its folder, status, seed, the values that could be sweep keys, and its metrics."""
    job: Path
    status: str | None
    seed: Any
    params: dict[str, Any]
    metrics: dict[str, float]
    optimized_metric: str | None


def collect_runs(sweep_dir: Path) -> list[Run]:
    """One run per job folder under ``sweep_dir`` that holds both ``config.yaml`` and ``metrics.json``.

    ``params`` are the job's overrides (values read from the resolved config where the key is a value there)
    when every job has ``.hydra/overrides.yaml``, else every key of its resolved config."""
    jobs = sorted((p.parent for p in Path(sweep_dir).rglob("metrics.json") if (p.parent / "config.yaml").is_file()),
                  key=_job_order)
    with_overrides = bool(jobs) and all((job / ".hydra" / "overrides.yaml").is_file() for job in jobs)
    runs = []
    for job in jobs:
        cfg = OmegaConf.load(job / "config.yaml")
        record = json.loads((job / "metrics.json").read_text())
        params = (_override_params(cfg, OmegaConf.load(job / ".hydra" / "overrides.yaml")) if with_overrides
                  else _flatten(OmegaConf.to_container(cfg)))
        runs.append(Run(job, record.get("status"), OmegaConf.select(cfg, SEED), params, record.get("metrics", {}),
                        OmegaConf.select(cfg, "optimized_metric", default=None)))
    return runs


def _override_params(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """Override key -> the resolved value where it is one (``optim.lr``), else the text (``optim=sgd``, ``~key``)."""
    params = {}
    for override in overrides:
        key, _, text = override.partition("=")
        value = OmegaConf.select(cfg, key.lstrip("+~"), default=None) if text else None
        params[key.lstrip("+~")] = value if value is not None and not OmegaConf.is_config(value) else text or override
    return params


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, child in node.items() for k, v in _flatten(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: str(node) if isinstance(node, (list, dict)) else node}


def _job_order(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def varying_keys(runs: list[Run], exclude: Sequence[str] = ("run_dir",)) -> list[str]:
    """The keys whose values differ between runs (a key missing from a run counts as a value), in order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.params))
    return [k for k in keys if k != SEED and k not in exclude
            and len({run.params.get(k) for run in runs}) > 1]


def _value_order(values: list[Any]) -> dict[Any, tuple]:
    """Numbers ascending, then everything else in order of first appearance."""
    first = list(dict.fromkeys(values))
    return {v: (0, v, 0) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, first.index(v))
            for v in first}


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def complete_runs(runs: list[Run], metrics: Sequence[str]) -> list[Run]:
    """The finished runs that hold every metric: those the summary counts."""
    return [run for run in runs if run.status == "finished" and all(m in run.metrics for m in metrics)]


def summarize(runs: list[Run], keys: Sequence[str], metrics: Sequence[str],
              average_over: str | None = None) -> list[dict[str, Any]]:
    """One row per combination of ``keys``: ``n`` finished runs holding every metric, and per metric M the
    columns ``M`` (mean) and ``M sd`` (sample sd over the runs; None for one run). With ``average_over``, then a
    row per combination of the other keys present for every value of that key: the mean of the row means."""
    groups: dict[tuple, list[Run]] = {}
    for run in complete_runs(runs, metrics):
        groups.setdefault(tuple(run.params.get(k) for k in keys), []).append(run)
    orders = [_value_order([combo[i] for combo in groups]) for i in range(len(keys))]
    rows = []
    for combo in sorted(groups, key=lambda c: tuple(order[v] for order, v in zip(orders, c))):
        row = {**dict(zip(keys, combo)), "n": len(groups[combo])}
        for m in metrics:
            row[m], row[f"{m} sd"] = _mean_sd([run.metrics[m] for run in groups[combo]])
        rows.append(row)
    if average_over not in keys:
        return rows
    others = [k for k in keys if k != average_over]
    n_values = len({row[average_over] for row in rows})
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault(tuple(row[k] for k in others), []).append(row)
    for combo, mine in cells.items():
        if len(mine) == n_values:
            average = {**dict(zip(others, combo)), average_over: f"average ({n_values})",
                       "n": min(row["n"] for row in mine)}
            for m in metrics:
                average[m], average[f"{m} sd"] = sum(row[m] for row in mine) / len(mine), None
            rows.append(average)
    return rows


def markdown(summary: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]) -> str:
    """The summary as a markdown table: the keys, each metric as mean ± sd, n."""
    lines = ["| " + " | ".join([*keys, *metrics, "n"]) + " |", "|" + "---|" * (len(keys) + len(metrics) + 1)]
    for row in summary:
        labels = [f"**{row[k]}**" if str(row[k]).startswith("average (") else str(row[k]) for k in keys]
        cells = [f"{row[m]:.4g}" + (f" ± {row[f'{m} sd']:.2g}" if row[f"{m} sd"] is not None else "")
                 for m in metrics]
        lines.append("| " + " | ".join([*labels, *cells, str(row["n"])]) + " |")
    return "\n".join(lines) + "\n"


def write_tables(sweep_dir: Path, metrics: Sequence[str] | None = None, average_over: str | None = None,
                 exclude: Sequence[str] = ("run_dir",), wandb_cfg: dict | None = None) -> list[Path]:
    """Write results.csv and results.md into ``sweep_dir`` (and the W&B tables when ``wandb_cfg`` is given)."""
    sweep_dir = Path(sweep_dir)
    runs = collect_runs(sweep_dir)
    metrics = list(metrics or dict.fromkeys(r.optimized_metric for r in runs if r.optimized_metric))
    keys = varying_keys(runs, exclude)
    summary = summarize(runs, keys, metrics, average_over)
    logged = sorted({m for r in runs for m in r.metrics} - set(metrics))
    columns = ["job", "status", SEED, *keys, *metrics, *logged]
    table = [{"job": str(r.job.relative_to(sweep_dir)), "status": r.status, SEED: r.seed,
              **{k: r.params.get(k) for k in keys}, **r.metrics} for r in runs]
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    left_out = len(runs) - len(complete_runs(runs, metrics))
    note = (f"\n{left_out} of {len(runs)} runs did not finish or lack a metric and are left out (see results.csv).\n"
            if left_out else "")
    (sweep_dir / "results.md").write_text(
        f"# Sweep results: {sweep_dir}\n\nMean ± sd over seeds (n finished runs) per combination of the keys the "
        f"sweep varies ({', '.join(keys) or 'none'}).\n\n{markdown(summary, keys, metrics)}{note}")
    if wandb_cfg is not None:
        _log_wandb(sweep_dir, columns, table, summary, wandb_cfg)
    return [sweep_dir / "results.csv", sweep_dir / "results.md"]


def _log_wandb(sweep_dir: Path, columns: list[str], table: list[dict], summary: list[dict], cfg: dict) -> None:
    import wandb

    mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or "offline"
    run = wandb.init(project=cfg.get("project", "blocktrain"), entity=cfg.get("entity"), group=cfg.get("group"),
                     name=f"{sweep_dir.parent.name}-{sweep_dir.name}-table", job_type="sweep-table",
                     dir=str(sweep_dir), mode=mode, reinit="create_new")
    summary_columns = list(dict.fromkeys(c for row in summary for c in row))
    run.log({"sweep/runs": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in table],
                                       allow_mixed_types=True),  # a key's values may be numbers and names
             "sweep/summary": wandb.Table(columns=summary_columns, allow_mixed_types=True,
                                          data=[[s.get(c) for c in summary_columns] for s in summary])})
    run.finish()


class SweepTable(Callback):
    """Hydra callback: the results tables of a multirun, written into its sweep directory when it ends."""

    def __init__(self, metrics: Sequence[str] | None = None, average_over: str | None = None,
                 exclude: Sequence[str] = ("run_dir",)):
        self.metrics = list(metrics) if metrics else None
        self.average_over = average_over
        self.exclude = list(exclude)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        logger = OmegaConf.to_container(config.logger, resolve=True) if config.get("logger") else {}
        wandb_cfg = logger if logger.get("kind") == "wandb" else None
        for path in write_tables(sweep_dir, self.metrics, self.average_over, self.exclude, wandb_cfg):
            print(f"sweep results: {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Results tables (CSV, markdown, W&B) of a sweep directory")
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", action="append", help="a metric to tabulate (repeatable; default: the "
                                                            "recipe's optimized_metric)")
    parser.add_argument("--average-over", help="a varied key to average the means over, e.g. data.dataset")
    parser.add_argument("--exclude", action="append", default=["run_dir"], help="a key that is never a row key")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to a W&B run (offline by default)")
    args = parser.parse_args(argv)
    for path in write_tables(Path(args.sweep_dir), args.metric, args.average_over, args.exclude,
                             {} if args.wandb else None):
        print(path)


if __name__ == "__main__":
    main()
