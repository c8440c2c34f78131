"""H4G vs plain hyperbolic vs Euclidean zero-shot node classification, same recipe, data and budget per arm.

    python benchmarks/h4g.py                                   # h4g_synthetic, seeds 0-4, the three arms
    python benchmarks/h4g.py --recipe h4g_zeroshot --seeds 0 1 2
    python benchmarks/h4g.py --set trainer.max_steps=100 data.synthetic_nodes=200
    python benchmarks/h4g.py --recipe h4g_zeroshot --set data.debian_max_nodes=2000 --log runs.jsonl

Each run is its own `train` process (the text features are cached across runs, so every arm sees identical
inputs). Prints, per arm, mean ± sd over seeds of zero-shot accuracy and macro-F1 (heterophilic / homophilic
targets and each target), the radius mean and 95th percentile, training throughput (nodes/s, the
``perf/samples_per_s`` of the last logged step) and the peak RSS of the run's process.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("h4g", "hyperbolic", "euclidean")


def run_one(recipe: str, arm: str, seed: int, extra: list[str], root: Path) -> dict:
    run_dir = root / f"{arm}-{seed}"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", "blocktrain.trainer.cli",
                           f"recipe={recipe}", f"plugin.h4g.geometry={arm}", f"seed={seed}", f"run_dir={run_dir}",
                           "logger=csv", "trainer.enable_progress_bar=false", *extra], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {**metrics, "wall_s": wall, "peak_rss_gb": int(proc.stdout.strip().splitlines()[-1]) / 2**20}


# runs its arguments as a child and prints that child's peak RSS (KiB): one number per run, not the running maximum
_MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="h4g_synthetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    parser.add_argument("--log", type=Path, help="append every run's metrics here as one JSON line (partial sweeps survive)")
    args = parser.parse_args()
    results = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # arms interleaved, so machine load drifts hit all of them alike
            for arm in args.arms:
                results[arm].append(run_one(args.recipe, arm, seed, args.set, Path(tmp)))
                if args.log is not None:
                    with open(args.log, "a") as f:
                        f.write(json.dumps({"arm": arm, "seed": seed, **results[arm][-1]}) + "\n")
                print(f"done: {arm} seed {seed}", file=sys.stderr)
    keys = sorted({k for runs in results.values() for r in runs for k in r
                   if k.startswith(("zeroshot/", "radius/")) and not k.endswith("labels_mean")})
    keys += ["perf/samples_per_s", "wall_s", "peak_rss_gb"]
    print(f"recipe {args.recipe}, seeds {args.seeds}, {platform.processor() or platform.machine()}, "
          f"overrides {args.set or 'none'}\n")
    print("| metric | " + " | ".join(args.arms) + " |")
    print("|---|" + "---:|" * len(args.arms))
    for key in keys:
        cells = [summary([r[key] for r in results[arm] if key in r]) if any(key in r for r in results[arm]) else "—"
                 for arm in args.arms]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
