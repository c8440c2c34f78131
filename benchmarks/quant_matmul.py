"""Time ``quant_matmul`` (packed low-bit weight) against a dense matmul with the same, dequantized, weight.

    python benchmarks/quant_matmul.py [--repeats N] [--bits 4 2] [--group 32] [--tokens 1 16 256] [--dtype bfloat16]

Shapes: SmolLM2-135M's MLP (576→1536, 1536→576) and Llama-7B's up projection (4096→11008), at 1, 16 and 256
tokens. On CPU (fp32, or --dtype bfloat16) the reference path (unpack, dequantize, ``F.linear``) and, with bf16
activations and W4 at a group size torch's int4 kernel takes, that kernel on the weight converted once by
``pack_for_cpu`` (the conversion's time is printed per shape); the dense side runs in the same dtype. On CUDA it
runs the Triton kernel (bf16) and the dense side is cuBLAS in bf16. Each time is the median of ``--repeats``
calls, with the 25th–75th percentile spread; all sides take turns so load changes hit them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# This folder holds a file named like the PyPI package `kernels`, which bitsandbytes tries to import.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blocktrain.kernels import dispatch, quant_matmul  # noqa: E402
from blocktrain.kernels.quant_matmul import dequantize_packed, pack_codes, pack_for_cpu  # noqa: E402
from blocktrain.trainer.testing import describe_machine, interleaved_times  # noqa: E402

SHAPES = [("SmolLM2 up", 576, 1536), ("SmolLM2 down", 1536, 576), ("Llama-7B up", 4096, 11008)]
TOKENS = (1, 16, 256)


def timed(fns: dict, device: torch.device, repeats: int) -> dict[str, tuple[float, float, float]]:
    """(median, 25th, 75th percentile) seconds of each function, taking turns."""
    times = interleaved_times(fns, device, repeats)
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        out[name] = (statistics.median(t), q[0], q[2])
    return out


def ms(t: tuple[float, float, float]) -> str:
    return f"{t[0] * 1e3:8.3f} [{t[1] * 1e3:.3f}–{t[2] * 1e3:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--group", type=int, default=32, help="input columns per scale/zero (0: per channel)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="activations and dense weight (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    path = dispatch.select(device, dtype)
    print(f"machine: {describe_machine(device)}; torch {torch.__version__}; {dtype}; quant_matmul path: {path}; "
          f"group {args.group or 'per channel'}; median [p25–p75] of {args.repeats} calls, ms; ratio = op / dense")
    print(f"{'shape':<14} {'bits':>4} {'tokens':>6} {'dense':>26} {'quant_matmul ' + path:>26} {'ratio':>6} "
          f"{'int4 kernel (CPU)':>26} {'ratio':>6} {'W dense MB':>10} {'W packed MB':>11}")
    gen = torch.Generator().manual_seed(0)
    for name, width, out in SHAPES:
        groups = 1 if not args.group else width // args.group
        for bits in args.bits:
            packed = pack_codes(torch.randint(0, 2**bits, (out, width), generator=gen), bits).to(device)
            scale = ((torch.rand(out, groups, generator=gen) + 0.5) / width**0.5).to(device, dtype)
            zero = torch.randint(0, 2**bits, (out, groups), generator=gen).to(device, dtype)
            weight = dequantize_packed(packed, scale, zero, bits, width).to(dtype)
            packed_mb = (packed.numel() * 4 + scale.numel() * scale.element_size() * 2) / 2**20
            start = time.perf_counter()
            cpu = pack_for_cpu(packed, scale, zero, bits, width)
            if cpu is not None and dtype == torch.bfloat16:
                print(f"  ({name}, W{bits}: pack_for_cpu took {(time.perf_counter() - start) * 1e3:.1f} ms once)")
            for tokens in args.tokens:
                x = torch.randn(tokens, width, generator=gen).to(device, dtype)
                fns = {"dense": lambda: F.linear(x, weight), "quant": lambda: quant_matmul(x, packed, scale, zero, bits)}
                if cpu is not None and dtype == torch.bfloat16:
                    fns["int4"] = lambda: quant_matmul(x, packed, scale, zero, bits, cpu_packed=cpu)
                with torch.no_grad():  # on CPU the dispatch picks the int4 kernel only given cpu_packed
                    t = timed(fns, device, args.repeats)
                int4 = f"{ms(t['int4']):>26} {t['int4'][0] / t['dense'][0]:6.2f}" if "int4" in t else f"{'-':>26} {'':>6}"
                print(f"{name:<14} {bits:>4} {tokens:>6} {ms(t['dense']):>26} {ms(t['quant']):>26} "
                      f"{t['quant'][0] / t['dense'][0]:6.2f} {int4} {weight.numel() * weight.element_size() / 2**20:10.1f} "
                      f"{packed_mb:11.1f}", flush=True)
            del weight

if __name__ == "__main__":
    main()
