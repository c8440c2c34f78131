"""Time ``pairwise_dist`` in float64 against its float32 path (``precision=auto`` on points inside the safe
radius), forward + backward, at H4G's logit shapes (node batch × label or text batch, D = 384).

    python benchmarks/poincare_dist.py [--repeats N] [--device cuda]

Points are expmap0 of Gaussian tangent vectors scaled to radius ≈ 2 (where H4G's texts sit), so ``auto``
takes the float32 path; the largest absolute difference of the two results is printed with the times.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from blocktrain.kernels.poincare import expmap0, pairwise_dist
from blocktrain.trainer.testing import describe_machine, interleaved_times

SHAPES = [(128, 128), (128, 2048), (1024, 1024)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{describe_machine(device)}, D = {args.dim}, median of {args.repeats}, forward + backward\n")
    print("| N × M | float64 ms | float32 path ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for n, m in SHAPES:
        x, y = (expmap0(torch.randn(k, args.dim, generator=gen) / args.dim ** 0.5).to(device).requires_grad_()
                for k in (n, m))

        def run(precision):
            return lambda: pairwise_dist(x, y, precision=precision).sum().backward()

        times = {p: statistics.median(t) for p, t in
                 interleaved_times({p: run(p) for p in ("float64", "auto")}, device, args.repeats).items()}
        with torch.no_grad():
            diff = (pairwise_dist(x, y, precision="float64").double() - pairwise_dist(x, y).double()).abs().max()
        print(f"| {n} × {m} | {times['float64'] * 1e3:.1f} | {times['auto'] * 1e3:.1f} | "
              f"{times['float64'] / times['auto']:.2f}× | {float(diff):.1e} |")


if __name__ == "__main__":
    main()
