"""Time every kernel op against its unfused reference, forward + backward, and print the ratios.

    python benchmarks/kernels.py [--repeats N]

Shapes are CLIP ViT-B/16's q/k/v adapters at batch 32: x of (32·197) × 768, W frozen (768 × 768),
r = 2, dropout 0.25, n_blocks 8 (Block-LoRA) and 1 (LoRA). On CPU only the reference path runs
(fp32); on CUDA the Triton path, the reference path and the unfused composition run (bf16), and the
op's time is set against a roofline from this GPU's measured copy bandwidth and matmul throughput.
``saved`` is the activation memory kept for the backward (parameters excluded).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

# This file is named like the PyPI package `kernels`, which bitsandbytes (under peft) tries to import.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from blocktrain.kernels import dispatch, lora_linear  # noqa: E402
from blocktrain.kernels.lora_linear import lora_linear_unfused  # noqa: E402
from blocktrain.trainer.testing import describe_machine, interleaved_times  # noqa: E402

ROWS, WIDTH, RANK, DROPOUT = 32 * 197, 768, 2, 0.25


def timed(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each function; the functions take turns, so load changes hit all alike."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, device, repeats).items()}


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages that autograd keeps for the backward of ``fn()``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return sum(seen.values())


def roofline(device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(bytes/s, flop/s) this device reaches on a large copy and a large matmul."""
    src = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    seconds = timed({"copy": lambda: dst.copy_(src), "matmul": lambda: a @ a}, device, repeats)
    return 2 * src.numel() / seconds["copy"], 2 * 4096**3 / seconds["matmul"]


def op_traffic(rows: int, width: int, out: int, rank: int, n_blocks: int, itemsize: int) -> tuple[int, int]:
    """(bytes, flops) that lora_linear's forward + backward cannot avoid, W frozen."""
    k = width // n_blocks
    elements = (rows * width + out * width + rows * out + rows * k  # forward: x, W, y, xs
                + rows * out + out * width + rows * k + rows * width)  # backward: g, W, xs, grad_x
    flops = 2 * rows * width * out * 2 + 2 * rows * rank * (k + out) * 3
    return elements * itemsize, flops


LABELS = {"unfused": "unfused (F.dropout + autograd)", "peft": "peft lora.Linear"}


def peft_layer(weight, bias, a, b) -> torch.nn.Module | None:
    """PEFT's lora.Linear holding the same weights (n_blocks = 1), or None without peft."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    base = torch.nn.Linear(WIDTH, WIDTH, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    base.requires_grad_(False)
    alpha = 0.5 * RANK  # scaling α/r = 0.5, as in the other rows
    layer = PeftLinear(base, "default", LoraConfig(r=RANK, lora_alpha=alpha, lora_dropout=DROPOUT), r=RANK,
                       lora_alpha=alpha, lora_dropout=DROPOUT).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, help="timed runs per variant (default 5 on CPU, 50 on CUDA)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.repeats = args.repeats or (50 if device.type == "cuda" else 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    print(f"machine: {describe_machine(device)}; torch {torch.__version__}; {dtype}")
    print(f"shapes: x {ROWS}x{WIDTH}, W {WIDTH}x{WIDTH} frozen, r={RANK}, dropout={DROPOUT}; "
          f"forward+backward, median of {args.repeats}")
    backends = ["triton", "reference"] if dispatch.select(device, dtype) == "triton" else ["reference"]
    if device.type == "cuda":
        bandwidth, peak = roofline(device, dtype, args.repeats)
        print(f"roofline (measured): copy {bandwidth / 1e9:.0f} GB/s, matmul {peak / 1e12:.1f} TFLOP/s")
    x = torch.randn(ROWS, WIDTH, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(WIDTH, WIDTH, device=device, dtype=dtype) / WIDTH**0.5
    bias = torch.zeros(WIDTH, device=device, dtype=dtype)
    grad = torch.randn(ROWS, WIDTH, device=device, dtype=dtype)
    for n_blocks in (8, 1):
        a = torch.randn(RANK, WIDTH // n_blocks, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(WIDTH, RANK, device=device, dtype=dtype, requires_grad=True)
        forwards: dict[str, Callable[[], torch.Tensor]] = {
            "unfused": lambda: lora_linear_unfused(x, weight, bias, a, b, 0.5, n_blocks, DROPOUT)}
        for backend in backends:
            forwards[backend] = functools.partial(fused, backend, x, weight, bias, a, b, 0.5, n_blocks)
        params = [weight, bias, a, b]
        if n_blocks == 1 and (peft := peft_layer(weight, bias, a, b)) is not None:
            forwards["peft"] = functools.partial(peft, x)
            params += list(peft.parameters())
        leaves = [x, a, b, *(p for p in params[4:] if p.requires_grad)]
        seconds = timed({name: functools.partial(step, fn, grad, leaves) for name, fn in forwards.items()},
                        device, args.repeats)
        saved = {name: saved_bytes(fn, params) for name, fn in forwards.items()}
        print(f"\nn_blocks={n_blocks}")
        for name in forwards:
            line = (f"  {LABELS.get(name, f'lora_linear [{name}]'):32s} {seconds[name] * 1e3:8.2f} ms "
                    f"(x{seconds['unfused'] / seconds[name]:.2f} speed vs unfused), saved for backward "
                    f"{saved[name] / 2**20:5.1f} MiB (x{saved[name] / saved['unfused']:.2f})")
            if device.type == "cuda" and name in backends:
                moved, flops = op_traffic(ROWS, WIDTH, WIDTH, RANK, n_blocks, x.element_size())
                ideal = max(moved / bandwidth, flops / peak)
                line += (f"; {moved / seconds[name] / 1e9:.0f} GB/s, {flops / seconds[name] / 1e12:.1f} "
                         f"TFLOP/s, {ideal / seconds[name]:.0%} of roofline")
            if name == "peft":
                line += f"; lora_linear [{backends[0]}] is x{seconds['peft'] / seconds[backends[0]]:.2f} faster"
            print(line)


def fused(backend: str, *args) -> torch.Tensor:
    with dispatch.use_backend(backend):
        return lora_linear(*args, DROPOUT)


def step(forward: Callable[[], torch.Tensor], grad: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    forward().backward(grad)
    for leaf in leaves:
        leaf.grad = None


if __name__ == "__main__":
    main()
