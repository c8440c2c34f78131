"""Time ``block_sparse_linear`` (BSR weight at 50% block density) against the dense matmul with the same weight
(zeros included) and against torch's BSR matmul, forward and forward+backward.

    python benchmarks/lpvit.py [--repeats N] [--shapes smollm2 deit-b] [--blocks 16 32]

Shapes: SmolLM2-135M's MLP up projection (576→1536) at 4×512 tokens, DeiT-B's MLP (768→3072, 3072→768) at 197×64
tokens. On CPU the op runs its reference gather-GEMM (fp32); on CUDA its Triton kernel. Each time is the median of
``--repeats`` calls with the 25th–75th percentile spread; all sides take turns so load changes hit them alike.
The limit at 50% block density is 2× (half the FLOPs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

# This folder holds a file named like the PyPI package `kernels`, which bitsandbytes tries to import.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from blocktrain.kernels import dispatch  # noqa: E402
from blocktrain.kernels.block_sparse_linear import block_sparse_linear, to_bsr  # noqa: E402
from blocktrain.trainer.testing import describe_machine, interleaved_times  # noqa: E402

SHAPES = {"smollm2": [("SmolLM2 up", 576, 1536, 2048)],
          "deit-b": [("DeiT-B fc1", 768, 3072, 197 * 64), ("DeiT-B fc2", 3072, 768, 197 * 64)]}


def case(inp: int, out: int, tokens: int, block: int, device: torch.device, backward: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(out // block, inp // block, generator=gen) < 0.5
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["smollm2"], choices=sorted(SHAPES))
    parser.add_argument("--blocks", nargs="+", type=int, default=[32])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(describe_machine(device))
    print(f"backend: {dispatch.select(device, torch.float32)}")
    print("| shape | tokens | block | pass | dense ms | ours ms | ours / dense speed | torch BSR ms |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for key in args.shapes:
        for label, inp, out, tokens in SHAPES[key]:
            for block in args.blocks:
                for backward in (False, True):
                    with torch.set_grad_enabled(backward):
                        times = interleaved_times(case(inp, out, tokens, block, device, backward), device, args.repeats)
                    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                    bsr = f"{med['torch_bsr']:.1f}" if "torch_bsr" in med else "—"
                    print(f"| {label} {inp}→{out} | {tokens} | {block} | {'fwd+bwd' if backward else 'fwd'} | "
                          f"{med['dense']:.1f} | {med['ours']:.1f} | {med['dense'] / med['ours']:.2f}× | {bsr} |",
                          flush=True)


if __name__ == "__main__":
    main()
