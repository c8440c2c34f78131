"""Prune-then-quantize chain on SmolLM2-135M-Instruct (Q4_1-dequantized GGUF), Austen: perplexity and size on disk.

    python benchmarks/pruning.py --setup               # once: the assets
    python benchmarks/prune_quantize.py                # dense, Wanda 50%, W4A16 RTN, Wanda 50% + W4A16 RTN; seeds 0 1 2
    python benchmarks/prune_quantize.py --setting W4A16-g64 --seeds 0 --quick

The chain of recipes/prune_quantize_llm.yaml (Wanda at 50% density per output row, then weight-only W4 quantization
holding the pruned entries at the zero point), with RTN as the quantizer (no calibration data; asymmetric min–max,
so a pruned zero keeps code = zero point exactly: checked). Wanda is one pass over --calib windows drawn with the
seed (benchmarks/quantization.py's windows and held-out set: the same helpers). Each arm starts from a fresh copy
of the dense model. Size on disk: the safetensors files of the export, nothing else (config, tokenizer and
quantization.json left out), split into the quantizable Linears' tensors (weights, or packed codes + scales +
zero points) and the rest (embeddings = the tied head, norms); the dense and pruned-only models as
``save_pretrained`` writes them in fp32, the quantized ones in compressed-tensors' ``pack-quantized`` layout
(``trainer/compression/packing.py``), which stores pruned zeros as codes: no sparse packing.
"""
from __future__ import annotations

import argparse
import copy
import json
import runpy
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# This folder holds a file named like the PyPI package `kernels`, which bitsandbytes tries to import.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
HERE = Path(__file__).resolve().parent


def _quantization_benchmark() -> SimpleNamespace:
    """benchmarks/quantization.py: its model source, setting parser and RTN arm (and through it the assets)."""
    return SimpleNamespace(**runpy.run_path(str(HERE / "quantization.py"), run_name="quantization_benchmark"))


def safetensors_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the safetensors files under ``folder``: total, the decoder layers' Linear tensors, the rest."""
    linear, total = 0, 0
    for file in folder.rglob("*.safetensors"):
        total += file.stat().st_size
        with file.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, entry in header.items():
            if key != "__metadata__" and "_proj." in key:
                start, end = entry["data_offsets"]
                linear += end - start
    return {"total": total, "linear": linear, "rest": total - linear}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, two novels")
    parser.add_argument("--setting", default="W4A16", help="weight-only setting of the quantizer, e.g. W4A16-g64")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib", type=int, default=32, help="Wanda's calibration windows")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Wanda's windows drawn with each")
    parser.add_argument("--no-baselines", action="store_true", help="only the Wanda arms (dense and RTN need no seed)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.calib, args.eval_windows = 64, 8, 8
    quant = _quantization_benchmark()
    bench = quant._pruning_benchmark()
    missing = bench.missing_assets()
    if missing:
        print("SKIPPED: missing " + " and ".join(missing) + ". Install them with: python benchmarks/pruning.py --setup")
        return
    results = run(args, quant, bench)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def run(args, quant, bench) -> dict:
    import os

    import torch
    from torch.utils.data import Subset

    from blocktrain.plugins.sparsity import wanda_prune
    from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
    from blocktrain.trainer.compression.evaluation import perplexity
    from blocktrain.trainer.compression.masks import find_linear_names
    from blocktrain.trainer.compression.packing import export_quantized, quant_linears
    from blocktrain.trainer.compression.quant import QuantSpec
    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import gguf_to_clean_model, load_model

    bits, act_bits, group = quant.parse_setting(args.setting)
    if act_bits != 16:
        raise SystemExit(f"--setting must be weight-only (A16), got {args.setting}")
    spec = QuantSpec(bits, False, group)
    print(f"# Prune-then-quantize{' (QUICK SMOKE RUN)' if args.quick else ''}\n{time.strftime('%Y-%m-%d %H:%M %Z')}, "
          f"load {os.getloadavg()[0]:.2f}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
          f"SmolLM2-135M-Instruct (Q4_1-dequantized GGUF), seq_len {args.seq_len}, Wanda on {args.calib} windows "
          f"(seeds {args.seeds}), {args.eval_windows} held-out windows; quantizer RTN {args.setting}\n", flush=True)
    loaded = load_model(quant.gguf_source())
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    novels = ("northangerabbey", "persuasion") if args.quick else bench.NOVELS
    data = build_datasets({"kind": "text_corpus", "files": [str(bench.AUSTEN / f"{n}.txt") for n in novels],
                           "seq_len": args.seq_len, "val_fraction": 0.05, "batch_size": 1}, tokenizer=tokenizer)
    held_out = Subset(data.val, range(args.eval_windows))
    rows: list[dict] = []

    def arm(name: str, seed: int | None, prune: bool, quantize: bool) -> None:
        model = copy.deepcopy(dense)
        names = find_linear_names(model)
        n = sum(model.get_submodule(name).weight.numel() for name in names)
        start = time.perf_counter()
        masks = {}
        if prune:
            batches = calibration_batches(data, args.calib, 8, seed=seed)
            masks = wanda_prune(model, batches, calibration_forward, 0.5, names, "row", sequential=False)
        zeros = sum(int((~mask).sum()) for mask in masks.values())
        if quantize:
            quant.rtn_arm(model, None, spec, None, args)
            for layer, q in quant_linears(model).items():
                if layer in masks:  # a pruned weight keeps code = zero point: it dequantizes to exactly 0
                    zero = q.zero.repeat_interleave(q.codes.shape[1] // q.zero.shape[1], 1)
                    assert torch.equal(q.codes[~masks[layer]].float(), zero[~masks[layer]].float()), layer
        seconds = time.perf_counter() - start
        ppl = perplexity(model, held_out, batch_size=8)["ppl"]
        with tempfile.TemporaryDirectory() as tmp:
            if quantize:
                folder = export_quantized(model, tmp, formats=("compressed-tensors",))["compressed-tensors"]
            else:
                folder = Path(tmp) / "dense"
                gguf_to_clean_model(model).save_pretrained(folder)
            size = safetensors_bytes(folder)
        row = {"arm": name, "seed": seed, "ppl": ppl, "zero_fraction": zeros / n, "seconds": seconds,
               "bytes": size}
        rows.append(row)
        print(f"| {name} | {'-' if seed is None else seed} | {ppl:.2f} | {zeros / n:.3f} | {seconds:.1f} | "
              f"{size['total'] / 1e6:.1f} | {size['linear'] / 1e6:.1f} | {size['rest'] / 1e6:.1f} |", flush=True)
        del model

    print("| arm | seed | perplexity | zero fraction of Linear weights | prune+quantize s | safetensors MB | "
          "of which Linears MB | rest MB |\n|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    if not args.no_baselines:
        arm("dense (fp32)", None, False, False)
        arm(f"RTN {args.setting}", None, False, True)
    for seed in args.seeds:
        arm("Wanda 50%", seed, True, False)
        arm(f"Wanda 50% + RTN {args.setting}", seed, True, True)
    summary = {}
    for name in dict.fromkeys(r["arm"] for r in rows):
        values = [r["ppl"] for r in rows if r["arm"] == name]
        summary[name] = {"n": len(values), "mean": statistics.mean(values),
                         "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    print("\n| arm | n | perplexity mean ± sd |\n|---|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['n']} | {s['mean']:.2f} ± {s['sd']:.2f} |")
    print(f"\nload after: {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M %Z')}")
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows,
            "summary": summary}


if __name__ == "__main__":
    main()
