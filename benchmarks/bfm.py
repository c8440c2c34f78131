"""Blockwise Flow Matching vs single-network flow matching on Fashion-MNIST, at an equal wall-clock training budget.

Arms (each trained from scratch for ``--budget`` seconds per seed, in its own process for a clean peak RSS; sizes
read from the recipes ``fm_fashion`` and ``bfm_fashion``, so the benchmark measures what the recipes train):
  fm         one SiT network, 6 blocks of width 96 (patch 4 on 32x32: 64 tokens);
  bfm        K = 4 segments, trunk 5 + segment 1 blocks of width 96 (the same blocks per step, in the paper's
             trunk:segment proportion), no alignment;
  bfm_align  bfm + the trunk aligned to EfficientNet-Lite0 block-10 features (λ_proj 0.05);
  +frn       the last BFM arm after it is measured + ``--frn-budget`` seconds of FRN training (1 block, all else
             frozen), sampled with the FRN sampler (the full trunk once per segment).
Quality of ``--samples`` class-balanced Euler samples at each total step count of ``--steps``: Fréchet distance and
KID over EfficientNet-Lite0 pooled features (input ``--feature-size``) vs ``--real`` Fashion-MNIST test images, and
class accuracy under a small CNN trained here on the Fashion-MNIST training split (cached; its test accuracy is
printed). FLOPs per sample counted by torch's FLOP counter. Prints one JSON line per arm and seed, then a table;
``--plot`` writes FD and accuracy vs GFLOPs/sample as a PNG (drawn with Pillow).

  nice -n 10 python benchmarks/bfm.py --budget 400 --frn-budget 60 --seeds 0 1 --arms fm bfm --plot bfm.png
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


def build(arm: str):
    from omegaconf import OmegaConf

    from blocktrain.plugins.bfm.model import BFM
    from blocktrain.trainer.generative.models import SiT

    m = OmegaConf.load(RECIPES / ("fm_fashion.yaml" if arm == "fm" else "bfm_fashion.yaml")).model
    if arm == "fm":
        return SiT(m.image_size, m.channels, m.patch, m.hidden, m.depth, m.heads, num_classes=m.num_classes,
                   class_dropout=m.class_dropout)
    return BFM(m.image_size, m.channels, m.patch, m.hidden, m.heads, segments=m.segments, trunk_depth=m.trunk_depth,
               segment_depth=m.segment_depth, frn_depth=m.frn_depth, num_classes=m.num_classes,
               class_dropout=m.class_dropout, proj_hidden=m.proj_hidden, align_dim=m.align_dim, ada_rank=m.ada_rank)


def classifier(data, cache: str, epochs: int):
    """A small CNN on the 32x32 Fashion-MNIST images, trained once (seed 0) and cached; returns it and its test accuracy."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))
    path = Path(cache).expanduser() / f"fashion_cnn_e{epochs}.pt"
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x, y = data.train.tensors
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(128):
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    net.eval().requires_grad_(False)
    x, y = data.val.tensors
    return net, accuracy(net, x, y)


def accuracy(net, images, labels) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([net(x).argmax(1) for x in images.split(500)])
    return float((pred == labels).float().mean())


def train_for(model, data, seconds: float, seed: int, step_fn, params) -> dict:
    import torch

    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = data.tensors
    steps, start = 0, time.perf_counter()
    model.train()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(x_all), (64,), generator=gen)
        loss = step_fn(x_all[idx], y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps += 1
    elapsed = time.perf_counter() - start
    model.eval()
    return {"train_steps": steps, "train_s": elapsed, "images_per_s": steps * 64 / elapsed, "last_loss": float(loss)}


def one(arm: str, seed: int, args) -> list[dict]:
    import torch

    from blocktrain.plugins.bfm.core import BFMVelocity, bfm_loss, frn_loss
    from blocktrain.trainer.generative.config import EncoderConfig, SamplerConfig
    from blocktrain.trainer.generative.encoders import build_encoder, feature_tokens
    from blocktrain.trainer.generative.evaluation import fd_and_kid, generate, real_features
    from blocktrain.trainer.generative.flow import fm_loss
    from blocktrain.trainer.sources.data import build_datasets

    torch.manual_seed(seed)
    torch.set_num_threads(args.threads)
    data = build_datasets({"kind": "idx_images", "batch_size": 64})
    model = build(arm)
    record = {"arm": arm, "seed": seed, "budget_s": args.budget, "load": Path("/proc/loadavg").read_text().split()[:3]}
    if arm == "fm":
        def step(x, y):
            return fm_loss(model, x, y, torch.rand(x.shape[0]), torch.randn_like(x))
    else:
        encoder = build_encoder(EncoderConfig(input_size=128, block=10)) if arm == "bfm_align" else None

        def step(x, y):
            target = feature_tokens(encoder(x), model.grid) if encoder is not None else None
            terms = bfm_loss(model, x, y, torch.randn_like(x), torch.rand(x.shape[0]), target)
            return terms["velocity"] + 0.05 * terms.get("align", 0.0)
    stage1 = [p for n, p in model.named_parameters() if not n.startswith("frn_")]
    record.update(train_for(model, data.train, args.budget, seed, step, stage1))

    cnn, _ = classifier(data, args.cache, args.classifier_epochs)
    features = build_encoder(EncoderConfig(input_size=args.feature_size), pooled=True)
    real_images = data.val.tensors[0][:args.real]
    real = real_features(features, real_images, args.cache, {"data": "fashion-mnist-t10k", "n": len(real_images),
                                                              "size": args.feature_size})

    def measure(record: dict, frn: bool) -> dict:
        for steps in args.steps:
            sampler = SamplerConfig(steps=steps, num_samples=args.samples, batch_size=100, seed=1000 + seed, frn=frn)
            velocity = (lambda: (lambda x, t, y, k, first: model(x, t, y))) if arm == "fm" \
                else (lambda: BFMVelocity(model, frn=frn))
            out = generate(velocity, (1, 32, 32), 10, args.samples, sampler, 1 if arm == "fm" else 4, "cpu")
            labels = torch.arange(args.samples) % 10  # generate's class-balanced labels
            record[f"steps{steps}"] = {"nfe": out.nfe, "gflops": out.flops_per_sample / 1e9,
                                       "acc": accuracy(cnn, out.images, labels),
                                       **fd_and_kid(features, real, out.images, 100)}
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return record

    records = [measure(record, frn=False)]
    if arm != "fm" and args.frn_budget > 0:
        frn = [p for n, p in model.named_parameters() if n.startswith("frn_")]
        phase2 = train_for(model, data.train, args.frn_budget, seed + 100,
                           lambda x, y: frn_loss(model, x, y, torch.randn_like(x), torch.rand(x.shape[0])), frn)
        extra = {k: v for k, v in record.items() if not k.startswith("steps")}
        records.append(measure({**extra, "arm": f"{arm}+frn", **{f"frn_{k}": v for k, v in phase2.items()}}, frn=True))
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per arm and seed")
    p.add_argument("--frn-budget", type=float, default=60.0, help="extra FRN training seconds (each BFM arm +frn)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32], help="total sampler steps (multiples of 4)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--real", type=int, default=1000)
    p.add_argument("--feature-size", type=int, default=96)
    p.add_argument("--classifier-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(Path.home() / ".cache/blocktrain/fd"))
    p.add_argument("--out", default="bfm_benchmark.jsonl")
    p.add_argument("--plot", help="write FD and accuracy vs GFLOPs/sample to this PNG")
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
        from blocktrain.trainer.sources.data import build_datasets

        _, acc = classifier(build_datasets({"kind": "idx_images", "batch_size": 64}), args.cache, args.classifier_epochs)
        print(json.dumps({"classifier_test_acc": acc}), flush=True)
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


def table(records: list[dict], steps: list[int]) -> dict[str, list[tuple]]:
    """Prints the markdown table; returns per arm [(gflops, fd mean, fd sd, acc mean)] over the step counts."""
    import statistics

    print("| arm | steps | NFE | GFLOPs/sample | FD (mean ± sd) | KID | sample acc (mean ± sd) | training steps | "
          "train images/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    rows: dict[str, list[tuple]] = {}
    for arm in dict.fromkeys(r["arm"] for r in records):
        rs = [r for r in records if r["arm"] == arm]
        for i, s in enumerate(st for st in steps if f"steps{st}" in rs[0]):
            fds, accs = [r[f"steps{s}"]["fd"] for r in rs], [r[f"steps{s}"]["acc"] for r in rs]
            sd = statistics.stdev(fds) if len(fds) > 1 else 0.0
            asd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            gflops = rs[0][f"steps{s}"]["gflops"]
            rows.setdefault(arm, []).append((gflops, statistics.mean(fds), sd, statistics.mean(accs)))
            trained = ", ".join(str(r["train_steps"]) + (f" + FRN {r['frn_train_steps']}" if "frn_train_steps" in r else "") for r in rs)
            print(f"| {arm} | {s} | {rs[0][f'steps{s}']['nfe']} | {gflops:.3f} | {statistics.mean(fds):.1f} ± {sd:.1f} | "
                  f"{statistics.mean(r[f'steps{s}']['kid'] for r in rs):.3f} | {statistics.mean(accs):.3f} ± {asd:.3f} | "
                  + (f"{trained} | {statistics.mean(r['images_per_s'] for r in rs):.1f} | "
                     f"{max(r['peak_rss_mb'] for r in rs):.0f} |" if i == 0 else " | | |"))
    return rows


def plot(rows: dict[str, list[tuple]], path: str) -> None:
    """FD (left) and sample accuracy (right) vs GFLOPs/sample, log-x, one line per arm (matplotlib is not a
    dependency; Pillow is)."""
    import math

    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    w, h, m = 520, 380, 60
    img = Image.new("RGB", (2 * w, h + 30), "white")
    draw = ImageDraw.Draw(img)
    xs = [math.log10(g) for pts in rows.values() for g, *_ in pts]
    for panel, (col, label) in enumerate(((1, "FD (EfficientNet-Lite0)"), (3, "sample accuracy"))):
        ys = [p[col] for pts in rows.values() for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
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
            draw.text((px - 12, h - m + 5), f"{10 ** gx:.2f}", fill="black")
            draw.text((ox + 5, py - 6), f"{gy:.4g}", fill="black")
        for i, (arm, pts) in enumerate(rows.items()):
            line = [at(math.log10(p[0]), p[col]) for p in pts]
            draw.line(line, fill=colours[i % 5], width=2)
            for x, y in line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[i % 5])
            draw.text((ox + m + 10 + 110 * i, h + 5), arm, fill=colours[i % 5])
    img.save(path)


if __name__ == "__main__":
    main()
