"""Blockwise Flow Matching vs single-network flow matching on Fashion-MNIST, at an equal wall-clock training budget.

Arms (each trained from scratch for ``--budget`` seconds per seed, in its own process for a clean peak RSS):
  fm         one SiT network, 6 blocks of width 96 (patch 4 on 32x32: 64 tokens);
  bfm        K = 4 segments, trunk 4 + segment 2 blocks of width 96 (the same blocks per step; per-token adaLN of
             rank 24, the official adaLN-LoRA's 288/1152 ratio), no alignment;
  bfm_align  bfm + the trunk aligned to EfficientNet-Lite0 block-10 features (λ_proj 0.05);
  bfm_frn    the bfm_align model after it is measured + ``--frn-budget`` seconds of FRN training (1 block, all else
             frozen), sampled with the FRN sampler (the full trunk once per segment).
Quality: Fréchet distance and KID over EfficientNet-Lite0 pooled features (input ``--feature-size``) of ``--samples``
class-balanced Euler samples vs ``--real`` Fashion-MNIST test images, at each total step count of ``--steps``;
FLOPs per sample counted by torch's FLOP counter. Prints one JSON line per arm and seed, then a table.

  nice -n 10 python benchmarks/bfm.py --budget 150 --frn-budget 60 --seeds 0 1 --samples 200 --steps 4 8 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("fm", "bfm", "bfm_align", "bfm_frn")


def build(arm: str):
    from blocktrain.plugins.bfm.model import BFM
    from blocktrain.trainer.generative.models import SiT

    if arm == "fm":
        return SiT(32, 1, 4, 96, 6, 4, num_classes=10, class_dropout=0.1)
    return BFM(32, 1, 4, 96, 4, segments=4, trunk_depth=4, segment_depth=2, frn_depth=1, num_classes=10,
               class_dropout=0.1, proj_hidden=256, align_dim=112, ada_rank=24)


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
    return {"steps": steps, "train_s": elapsed, "images_per_s": steps * 64 / elapsed, "last_loss": float(loss)}


def one(arm: str, seed: int, args) -> dict:
    import torch

    from blocktrain.plugins.bfm.core import BFMVelocity, bfm_loss, frn_loss
    from blocktrain.trainer.generative.config import EncoderConfig, SamplerConfig
    from blocktrain.trainer.generative.encoders import build_encoder, feature_tokens
    from blocktrain.trainer.generative.evaluation import fd_and_kid, generate, real_features
    from blocktrain.trainer.generative.flow import fm_loss
    from blocktrain.trainer.sources.data import build_datasets

    torch.manual_seed(seed)
    torch.set_num_threads(args.threads)
    data = build_datasets({"kind": "idx_images", "batch_size": 64, "max_val": args.real})
    model = build(arm)
    record = {"arm": arm, "seed": seed, "budget_s": args.budget}
    if arm == "fm":
        def step(x, y):
            return fm_loss(model, x, y, torch.rand(x.shape[0]), torch.randn_like(x))
    else:
        encoder = build_encoder(EncoderConfig(input_size=128, block=10)) if arm != "bfm" else None

        def step(x, y):
            target = feature_tokens(encoder(x), model.grid) if encoder is not None else None
            terms = bfm_loss(model, x, y, torch.randn_like(x), torch.rand(x.shape[0]), target)
            return terms["velocity"] + 0.05 * terms.get("align", 0.0)
    stage1 = [p for n, p in model.named_parameters() if not n.startswith("frn_")]
    record.update(train_for(model, data.train, args.budget, seed, step, stage1))

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
            record[f"steps{steps}"] = {"nfe": out.nfe, "gflops": out.flops_per_sample / 1e9,
                                       **fd_and_kid(features, real, out.images, 100)}
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return record

    records = [measure(record, frn=False)]
    if arm == "bfm_align" and args.frn_budget > 0:
        frn = [p for n, p in model.named_parameters() if n.startswith("frn_")]
        phase2 = train_for(model, data.train, args.frn_budget, seed + 100,
                           lambda x, y: frn_loss(model, x, y, torch.randn_like(x), torch.rand(x.shape[0])), frn)
        extra = {k: v for k, v in record.items() if not k.startswith("steps")}
        records.append(measure({**extra, "arm": "bfm_frn", **{f"frn_{k}": v for k, v in phase2.items()}}, frn=True))
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per arm and seed")
    p.add_argument("--frn-budget", type=float, default=60.0, help="extra FRN training seconds (bfm_frn)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS[:3]), choices=ARMS[:3], help="bfm_align also yields bfm_frn")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32], help="total sampler steps (multiples of 4)")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--real", type=int, default=1000)
    p.add_argument("--feature-size", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(Path.home() / ".cache/blocktrain/fd"))
    p.add_argument("--out", default="bfm_benchmark.jsonl")
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        for record in one(args.one[0], int(args.one[1]), args):
            print(json.dumps(record), flush=True)
        return
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
    table(records, args.steps)


def table(records: list[dict], steps: list[int]) -> None:
    import statistics

    print("| arm | steps | NFE | GFLOPs/sample | FD (mean ± sd) | KID | train images/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        rs = [r for r in records if r["arm"] == arm]
        if not rs:
            continue
        for s in steps:
            fds = [r[f"steps{s}"]["fd"] for r in rs]
            sd = statistics.stdev(fds) if len(fds) > 1 else 0.0
            print(f"| {arm} | {s} | {rs[0][f'steps{s}']['nfe']} | {rs[0][f'steps{s}']['gflops']:.4f} | "
                  f"{statistics.mean(fds):.2f} ± {sd:.2f} | {statistics.mean(r[f'steps{s}']['kid'] for r in rs):.4f} | "
                  f"{statistics.mean(r['images_per_s'] for r in rs):.0f} | {max(r['peak_rss_mb'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
