"""Blockwise Flow Matching vs single-network flow matching on Fashion-MNIST, at an equal optimiser-step budget.

Every arm trains from scratch for ``--train-steps`` AdamW steps of ``--batch`` images (drawn with the seed from the
first ``--train-images`` training images), each arm and seed in its own process (a clean peak RSS). The budget is in
steps, not seconds: the machine is shared and its load moves, so equal seconds would give arms run at different
loads different amounts of training; the per-step FLOPs are matched by construction, and the wall clock and
images/s are reported beside it. Sizes come from the recipes ``fm_fashion`` and ``bfm_fashion`` (``--hidden``
overrides the width of both):
  fm         one SiT network, 6 blocks (patch 4 on 32x32: 64 tokens);
  bfm        K = 4 segments, trunk 5 + segment 1 blocks (the same blocks per step, the paper's trunk share), no alignment;
  bfm_align  bfm + the trunk aligned to EfficientNet-Lite0 block-10 tokens (λ_proj 0.05); the targets are the
             plugin's content-keyed ``TokenCache``, precomputed once for the training images and saved in ``--cache``
             (exact: no augmentation, and a frozen encoder);
  +frn       each arm of ``--frn-arms`` after it is measured + ``--frn-steps`` steps training only the FRN (the
             recipe's 1 block, or ``--frn-depth``), sampled with the FRN sampler (the full trunk once per segment).
Quality of ``--samples`` class-balanced Euler samples (the same noise, ``--noise-seed``, for every arm and seed) at each
total step count of ``--steps``: Fréchet distance and KID in the 128-d feature space of a small CNN classifier
(trained once on the first ``--classifier-images`` training images and cached; the spec's FID proxy for small images) against the first
``--real`` test images, and the class accuracy of the samples under that classifier. FLOPs per sample from torch's
FLOP counter. Prints one JSON line per arm and seed, then a table; ``--plot`` draws FD, KID and accuracy vs
GFLOPs/sample (Pillow).

  nice -n 15 python benchmarks/bfm.py --train-steps 300 --frn-steps 150 --seeds 0 1 --plot bfm_fashion.png
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("fm", "bfm", "bfm_align")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def build(arm: str, hidden: int | None, frn_depth: int | None = None):
    from omegaconf import OmegaConf

    from blocktrain.plugins.bfm.model import BFM
    from blocktrain.trainer.generative.models import SiT

    m = OmegaConf.load(RECIPES / ("fm_fashion.yaml" if arm == "fm" else "bfm_fashion.yaml")).model
    width = hidden or m.hidden
    if arm == "fm":
        return SiT(m.image_size, m.channels, m.patch, width, m.depth, m.heads, num_classes=m.num_classes,
                   class_dropout=m.class_dropout)
    return BFM(m.image_size, m.channels, m.patch, width, m.heads, segments=m.segments, trunk_depth=m.trunk_depth,
               segment_depth=m.segment_depth, frn_depth=frn_depth or m.frn_depth, num_classes=m.num_classes,
               class_dropout=m.class_dropout, proj_hidden=m.proj_hidden, align_dim=m.align_dim, ada_rank=m.ada_rank)


def fashion(train_images: int | None = None):
    from blocktrain.trainer.sources.data import build_datasets

    return build_datasets({"kind": "idx_images", "batch_size": 64, "max_train": train_images})


def classifier(args, train=None):
    """The small CNN trained on ``train`` (the first ``--classifier-images`` training images) once and cached."""
    from blocktrain.trainer.generative.classifier import load_classifier

    key = {"data": f"fashion-mnist-train-{args.classifier_images}"}
    return load_classifier("train", train, 1, 10, args.cache, key, args.classifier_epochs)


def align_targets(args, grid: int = 8):
    """EfficientNet-Lite0 block-10 tokens (input 128: an 8x8 grid, the trunk's) of the training images, a TokenCache
    read from / written to ``--cache``; returns it and its file."""
    from blocktrain.trainer.generative.config import EncoderConfig
    from blocktrain.trainer.generative.encoders import TokenCache, build_encoder, feature_tokens

    encoder = build_encoder(EncoderConfig(input_size=128, block=10))
    cache = TokenCache(lambda images: feature_tokens(encoder(images), grid))
    path = Path(args.cache).expanduser() / f"align_tokens_effl0_128_b10_g{grid}_n{args.train_images}.pt"
    if path.is_file():
        cache.load(path)
    return cache, path


def train_steps(model, data, steps: int, batch: int, seed: int, step_fn, params) -> dict:
    import torch

    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.tensors
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        loss = step_fn(x_all[idx], y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    elapsed = time.perf_counter() - start
    model.eval()
    return {"train_steps": steps, "train_s": elapsed, "images_per_s": steps * batch / elapsed, "last_loss": float(loss)}


def one(arm: str, seed: int, args) -> list[dict]:
    import torch

    from blocktrain.plugins.bfm.core import BFMVelocity, bfm_loss, frn_loss
    from blocktrain.trainer.generative.classifier import class_accuracy
    from blocktrain.trainer.generative.config import SamplerConfig
    from blocktrain.trainer.generative.evaluation import fd_and_kid, generate
    from blocktrain.trainer.generative.flow import fm_loss

    torch.manual_seed(seed)
    torch.set_num_threads(args.threads)
    data = fashion(args.train_images)
    model = build(arm, args.hidden, args.frn_depth)
    record = {"arm": arm, "seed": seed, "batch": args.batch, "hidden": args.hidden, "frn_depth": args.frn_depth,
              "train_images": args.train_images,
              "load": Path("/proc/loadavg").read_text().split()[:3], "start_utc": time.strftime("%H:%M:%S", time.gmtime())}
    if arm == "fm":
        def step(x, y):
            return fm_loss(model, x, y, torch.rand(x.shape[0]), torch.randn_like(x))
    else:
        targets = align_targets(args, model.grid)[0] if arm == "bfm_align" else None

        def step(x, y):
            terms = bfm_loss(model, x, y, torch.randn_like(x), torch.rand(x.shape[0]),
                             targets(x) if targets is not None else None)
            return terms["velocity"] + 0.05 * terms.get("align", 0.0)
    stage1 = [p for n, p in model.named_parameters() if not n.startswith("frn_")]
    record.update(train_steps(model, data.train, args.train_steps, args.batch, seed, step, stage1))

    cnn = classifier(args)
    with torch.no_grad():
        real = torch.cat([cnn.features(x) for x in data.val.tensors[0][:args.real].split(500)])

    def measure(record: dict, frn: bool) -> dict:
        for steps in args.steps:
            sampler = SamplerConfig(steps=steps, num_samples=args.samples, batch_size=250, seed=args.noise_seed, frn=frn)
            velocity = (lambda: (lambda x, t, y, k, first: model(x, t, y))) if arm == "fm" \
                else (lambda: BFMVelocity(model, frn=frn))
            out = generate(velocity, (1, 32, 32), 10, args.samples, sampler, 1 if arm == "fm" else 4, "cpu")
            record[f"steps{steps}"] = {"nfe": out.nfe, "gflops": out.flops_per_sample / 1e9,
                                       "acc": class_accuracy(cnn, out.images, out.labels),
                                       **fd_and_kid(cnn.features, real, out.images, args.kid_subset)}
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["end_utc"] = time.strftime("%H:%M:%S", time.gmtime())
        return record

    records = [measure(record, frn=False)]
    if arm in args.frn_arms and args.frn_steps > 0:
        frn = [p for n, p in model.named_parameters() if n.startswith("frn_")]
        phase2 = train_steps(model, data.train, args.frn_steps, args.batch, seed + 100,
                             lambda x, y: frn_loss(model, x, y, torch.randn_like(x), torch.rand(x.shape[0])), frn)
        extra = {k: v for k, v in record.items() if not k.startswith("steps")}
        records.append(measure({**extra, "arm": f"{arm}+frn", **{f"frn_{k}": v for k, v in phase2.items()}}, frn=True))
    return records


def prepare(args) -> None:
    """The classifier and (for bfm_align) the alignment targets, computed once before the arms run."""
    from blocktrain.trainer.generative.classifier import class_accuracy

    test = fashion(64).val.tensors
    acc = class_accuracy(classifier(args, fashion(args.classifier_images).train), *test)
    print(json.dumps({"classifier_test_acc": acc}), flush=True)
    if "bfm_align" in args.arms:
        cache, path = align_targets(args)
        before = len(cache)
        for x in fashion(args.train_images).train.tensors[0].split(100):
            cache(x)
        if len(cache) > before:
            cache.save(path)
        print(json.dumps({"align_targets": len(cache), "file": str(path)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=300, help="optimiser steps per arm and seed")
    p.add_argument("--frn-steps", type=int, default=150, help="FRN-only steps after each arm of --frn-arms")
    p.add_argument("--frn-arms", nargs="*", default=["bfm"], choices=ARMS[1:])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=48, help="width of every arm (0: the recipes' 96)")
    p.add_argument("--frn-depth", type=int, default=0, help="FRN blocks (0: the recipe's 1)")
    p.add_argument("--train-images", type=int, default=6000, help="train on the first N training images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32], help="total sampler steps (multiples of 4)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--noise-seed", type=int, default=1234, help="sampling noise, the same for every arm and seed")
    p.add_argument("--real", type=int, default=2000)
    p.add_argument("--kid-subset", type=int, default=250)
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--classifier-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(Path.home() / ".cache/blocktrain/fd"))
    p.add_argument("--out", default="bfm_benchmark.jsonl")
    p.add_argument("--plot", help="write FD, KID and accuracy vs GFLOPs/sample to this PNG")
    p.add_argument("--table-from", help="only print the table (and plot) of this JSONL file")
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        for record in one(args.one[0], int(args.one[1]), args):
            print(json.dumps(record), flush=True)
        return
    if args.table_from:
        records = [json.loads(line) for line in Path(args.table_from).read_text().splitlines() if line.strip()]
    else:
        prepare(args)
        records = []
        for seed in args.seeds:
            for arm in args.arms:
                cmd = [sys.executable, __file__, "--one", arm, str(seed), *sys.argv[1:]]
                lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
                for line in (l for l in lines if l.startswith("{")):
                    records.append(json.loads(line))
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
                    print(line, flush=True)
    rows = table(records, args.steps)
    if args.plot:
        plot(rows, args.plot)


def table(records: list[dict], steps: list[int]) -> dict[str, list[dict]]:
    """Prints the markdown table; returns per arm one point per step count: gflops and the mean/sd of fd, kid, acc."""
    import statistics

    def stat(values):
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    print("| arm | steps | NFE | GFLOPs/sample | FD (mean ± sd) | KID (mean ± sd) | sample acc (mean ± sd) | "
          "training steps | train s | train images/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    rows: dict[str, list[dict]] = {}
    for arm in dict.fromkeys(r["arm"] for r in records):
        rs = [r for r in records if r["arm"] == arm]
        for i, s in enumerate(st for st in steps if f"steps{st}" in rs[0]):
            point = {"gflops": rs[0][f"steps{s}"]["gflops"]}
            for name in ("fd", "kid", "acc"):
                point[name], point[f"{name}_sd"] = stat([r[f"steps{s}"][name] for r in rs])
            rows.setdefault(arm, []).append(point)
            if i == 0:
                trained = ", ".join(str(r["train_steps"]) + (f" + FRN {r['frn_train_steps']}" if "frn_train_steps" in r
                                                             else "") for r in rs)
                seconds = ", ".join(f"{r['train_s']:.0f}" + (f" + {r['frn_train_s']:.0f}" if "frn_train_s" in r else "")
                                    for r in rs)
                extra = (f"{trained} | {seconds} | {statistics.mean(r['images_per_s'] for r in rs):.1f} | "
                         f"{max(r['peak_rss_mb'] for r in rs):.0f} |")
            else:
                extra = " | | | |"
            print(f"| {arm} | {s} | {rs[0][f'steps{s}']['nfe']} | {point['gflops']:.4f} | "
                  f"{point['fd']:.2f} ± {point['fd_sd']:.2f} | {point['kid']:.1f} ± {point['kid_sd']:.1f} | "
                  f"{point['acc']:.3f} ± {point['acc_sd']:.3f} | " + extra)
    return rows


def plot(rows: dict[str, list[dict]], path: str) -> None:
    """FD, KID and sample accuracy vs GFLOPs/sample (log-x), one line per arm with ±1 sd bars over the seeds
    (matplotlib is not a dependency; Pillow is)."""
    import math

    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    panels = (("fd", "FD (classifier features)"), ("kid", "KID"), ("acc", "sample accuracy"))
    w, h, m = 440, 380, 60
    img = Image.new("RGB", (len(panels) * w, h + 30), "white")
    draw = ImageDraw.Draw(img)
    xs = [math.log10(p["gflops"]) for pts in rows.values() for p in pts]
    for panel, (key, label) in enumerate(panels):
        ys = [p[key] + sign * p[f"{key}_sd"] for pts in rows.values() for p in pts for sign in (-1, 1)]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        x0, x1 = x0 - 0.05 * (x1 - x0 or 1), x1 + 0.05 * (x1 - x0 or 1)
        y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))
        ox = panel * w

        def at(x, y):
            return ox + m + (x - x0) / (x1 - x0 or 1) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

        draw.rectangle([ox + m, m, ox + w - m, h - m], outline="black")
        draw.text((ox + m, m - 20), f"{label} vs GFLOPs/sample (log)", fill="black")
        for frac in (0, 0.5, 1):
            gx, gy = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
            px, _ = at(gx, y0)
            _, py = at(x0, gy)
            draw.text((px - 12, h - m + 5), f"{10 ** gx:.3f}", fill="black")
            draw.text((ox + 5, py - 6), f"{gy:.3g}", fill="black")
        for i, (arm, pts) in enumerate(rows.items()):
            colour = colours[i % len(colours)]
            line = [at(math.log10(p["gflops"]), p[key]) for p in pts]
            draw.line(line, fill=colour, width=2)
            for p, (x, y) in zip(pts, line):
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                _, lo = at(0, p[key] - p[f"{key}_sd"])
                _, hi = at(0, p[key] + p[f"{key}_sd"])
                draw.line([(x, lo), (x, hi)], fill=colour, width=1)
            draw.text((ox + m + 10 + 100 * i, h + 5), arm, fill=colour)
    img.save(path)


if __name__ == "__main__":
    main()
