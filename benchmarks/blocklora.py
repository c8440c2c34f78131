"""Block-LoRA vs our LoRA vs PEFT's LoRA on CLIP ViT-B/16 (random weights): training-step time and peak memory.

    python benchmarks/blocklora.py             # B in {8, 32} x C in {10, 100}, plus C = 1000, B = 32 with and
                                               # without text checkpointing + chunking (100 prompts per chunk)
    python benchmarks/blocklora.py --points grid       # only the B x C grid; --points imagenet: only C = 1000
    python benchmarks/blocklora.py --quick     # smoke test: B = 2, C = 10, 2 timed steps

A step is the clip_few_shot task's training step: text features of "a photo of a {}." over all C class names
through the text tower with gradients, the image tower on B images, 100 * cos, cross-entropy, backward, AdamW.
Adapters on q/k/v of both towers, r = 2, alpha = 1, alpha/sqrt(r), dropout 0.25; Block-LoRA n = 8; PEFT with
use_rslora (the same alpha/sqrt(r)). fp16 autocast + GradScaler on CUDA (CLIP-LoRA's), fp32 on CPU. Class names
are synthetic (1-4 words, so prompts are 7-10 tokens, padded to the longest, as the task does).

Every (variant, B, C, text setting) runs in a fresh subprocess that reports its own peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps (weights included), on CPU the process's peak resident
set size (``ru_maxrss``) and, to separate training from loading, the resident size before the first step.
Step time is the median of ``--steps`` steps after ``--warmup``. Ratios are against our LoRA.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bitsandbytes (imported by peft) imports a package named `kernels`; keep benchmarks/kernels.py out of its way.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

VARIANTS = ("blocklora", "lora", "peft")
WORDS = ("red green blue small large striped spotted wild domestic tropical northern river mountain desert old "
         "new wooden metal glass paper stone bird fish cat dog flower tree car plane boat house").split()


def class_names(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.sample(WORDS, rng.randint(1, 4))) + f" {i}" for i in range(count)]


def vit_b16():
    """OpenAI CLIP ViT-B/16's architecture, randomly initialised (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                         num_hidden_layers=12, max_position_embeddings=77),
                        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                           num_hidden_layers=12, patch_size=16, image_size=224),
                        projection_dim=512)
    return CLIPModel(config)


def adapt(model, variant: str):
    qkv = ["q_proj", "k_proj", "v_proj"]
    if variant == "blocklora":
        from blocktrain.plugins.blocklora import apply_block_lora

        return apply_block_lora(model, targets=qkv, rank=2, n_blocks=8, alpha=1.0, scaling="sqrt_rank", dropout=0.25)
    if variant == "lora":
        from blocktrain.plugins.lora import apply_lora

        return apply_lora(model, targets=qkv, rank=2, alpha=1.0, dropout=0.25, scaling="sqrt_rank")
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=qkv, use_rslora=True))


def worker(spec: dict) -> dict:
    """One measurement in this process: build, adapt, warm up, time, report."""
    import torch
    from omegaconf import OmegaConf

    from blocktrain.trainer.sources.tiny_clip import clip_style_tokenizer
    from blocktrain.trainer.tasks import build_task

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    names = class_names(spec["classes"])
    model = adapt(vit_b16(), spec["variant"]).to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    task = build_task(OmegaConf.create({"kind": "clip_few_shot", "text_chunk_size": spec["chunk"],
                                        "text_checkpointing": spec["checkpointing"]}),
                      {"class_names": names, "templates": ["a photo of a {}."]})
    task.setup(model, argparse.Namespace(tokenizer=clip_style_tokenizer([f"a photo of a {n}." for n in names], 77)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(enabled=cuda)
    images = torch.randn(spec["batch"], 3, 224, 224, device=device)
    labels = torch.randint(0, spec["classes"], (spec["batch"],), device=device)

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = task.loss(model, (images, labels))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for _ in range(spec["warmup"]):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(spec["steps"])]
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {**spec, "trainable": trainable, "step_s": statistics.median(times), "peak_gib": peak,
            "loaded_gib": None if cuda else loaded_rss}


def measure(spec: dict) -> dict | None:
    """Run one point in a fresh process; None (with the reason printed) when it fails, e.g. killed out of memory."""
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if out.returncode in (-9, 137) else f"exit {out.returncode}"
        print(f"worker {spec} failed: {reason}\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(lines[-1])


def points(which: str) -> list[dict]:
    if which == "quick":
        return [dict(batch=2, classes=10, chunk=None, checkpointing=False)]
    grid = [dict(batch=b, classes=c, chunk=None, checkpointing=False) for b in (8, 32) for c in (10, 100)]
    imagenet = [dict(batch=32, classes=1000, chunk=None, checkpointing=False),
                dict(batch=32, classes=1000, chunk=100, checkpointing=True)]
    return {"grid": grid, "imagenet": imagenet, "all": grid + imagenet}[which]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: B=2, C=10, 1 warm-up + 2 timed steps")
    parser.add_argument("--steps", type=int, help="timed steps per point (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; quick 1)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--points", choices=("all", "grid", "imagenet"), default="all",
                        help="grid: B in {8, 32} x C in {10, 100}; imagenet: C = 1000, B = 32 with and without "
                             "text checkpointing + chunking; all: both")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    import torch

    from blocktrain.trainer.testing import describe_machine

    cuda = torch.cuda.is_available()
    print(f"machine: {describe_machine()}; torch {torch.__version__}; {'fp16 autocast' if cuda else 'fp32'}; "
          f"median of {steps} steps after {warmup}; each point in a fresh process")
    memory = "peak CUDA GiB" if cuda else "peak RSS GiB (before 1st step)"
    print(f"| B | C | text | variant | trainable | step s | vs lora | {memory} | vs lora |")
    print("|---|---|---|---|---|---|---|---|---|")
    for point in points("quick" if args.quick else args.points):
        results = {v: measure({**point, "variant": v, "steps": steps, "warmup": warmup}) for v in args.variants}
        base = results.get("lora")
        text = f"chunk {point['chunk']} + ckpt" if point["checkpointing"] else "plain"
        for variant, r in results.items():
            if r is None:
                print(f"| {point['batch']} | {point['classes']} | {text} | {variant} | failed (see stderr) |", flush=True)
                continue
            mem = f"{r['peak_gib']:.2f}" + (f" ({r['loaded_gib']:.2f})" if r["loaded_gib"] is not None else "")
            time_ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "—"
            mem_ratio = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "—"
            print(f"| {point['batch']} | {point['classes']} | {text} | {variant} | {r['trainable']:,} | "
                  f"{r['step_s']:.3f} | {time_ratio} | {mem} | {mem_ratio} |", flush=True)


if __name__ == "__main__":
    main()
