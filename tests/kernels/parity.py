"""Parity harness: every Triton kernel against its PyTorch reference, on fresh random inputs.

An op's test module lists ``CASES`` (:class:`ParityCase`) and ``CHECKS`` (:class:`Check`) in a
module named in :data:`CASE_MODULES`. They run in one subprocess, ``python -m <package>.parity
MODULE...``: on the CPU under ``TRITON_INTERPRET=1`` (set before Triton is imported, so the pytest
process never sees it), or on CUDA where there is a GPU. Each result comes back as one JSON line.

A case builds its inputs in fp32 from a fresh seed (printed on failure), casts them to its dtype and
runs the Triton path with every kernel output poisoned; the reference runs on the same values
upcast (fp64 for fp32 cases, fp32 otherwise). Outputs, and the gradients named in ``grad``, must be
finite, of the case's dtype, and within ``tol · (max|ref| + |ref|)`` of the reference.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blocktrain.kernels import dispatch

CASE_MODULES = ("cases_lora_linear", "cases_quant_matmul", "cases_fake_quant", "cases_block_sparse_linear",
                "cases_poincare")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

Outputs = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class ParityCase:
    """One comparison. ``build(gen)`` returns keyword inputs (floating tensors in fp32 on the CPU);
    ``triton(**inputs)`` and ``reference(**inputs)`` return a tensor or a tuple of tensors."""

    name: str
    build: Callable[[torch.Generator], dict[str, Any]]
    triton: Callable[..., Outputs]
    reference: Callable[..., Outputs]
    dtype: torch.dtype = torch.float32
    grad: tuple[str, ...] = ()
    tol: float | None = None


@dataclass(frozen=True)
class Check:
    """A free-form check that needs the Triton path: ``run(device)`` raises on failure."""

    name: str
    run: Callable[[torch.device], None]


def _tuple(out: Outputs) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _prepare(value: Any, dtype: torch.dtype, device: torch.device, grad: bool) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return value.detach().requires_grad_(grad)


def _compare(label: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, tol: float) -> None:
    if got.dtype != dtype:
        raise AssertionError(f"{label}: dtype {got.dtype}, expected {dtype}")
    if got.shape != want.shape:
        raise AssertionError(f"{label}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{label}: {int((~torch.isfinite(got)).sum())} of {got.numel()} values not finite "
                             "(an output element the kernel never wrote stays NaN)")
    want = want.detach()
    err = (got.detach().to(want.dtype) - want).abs()
    bound = tol * (want.abs().max() + want.abs())
    if (err > bound).any():
        worst = int((err - bound).argmax())
        raise AssertionError(f"{label}: {int((err > bound).sum())} of {err.numel()} values off; worst at flat "
                             f"index {worst}: got {got.flatten()[worst].item():.6g}, want "
                             f"{want.flatten()[worst].item():.6g} (max |ref| {want.abs().max().item():.4g}, "
                             f"tol {tol})")


def run_case(case: ParityCase, device: torch.device, seed: int | None = None) -> None:
    """Run one case; raises AssertionError naming the output and the seed on a mismatch."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    try:
        gen = torch.Generator().manual_seed(seed)
        raw = case.build(gen)
        ref_dtype = torch.float64 if case.dtype == torch.float32 else torch.float32
        ours = {k: _prepare(v, case.dtype, device, k in case.grad) for k, v in raw.items()}
        theirs = {k: _prepare(v, ref_dtype, device, k in case.grad) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else ours[k] for k, v in ours.items()}
        with dispatch.use_backend("triton"), dispatch.poisoned_outputs():
            got = _tuple(case.triton(**ours))
        want = _tuple(case.reference(**theirs))
        if len(got) != len(want):
            raise AssertionError(f"{len(got)} outputs, the reference has {len(want)}")
        labels = [f"output {i}" for i in range(len(got))]
        if case.grad:
            cotangents = [torch.randn(t.shape, generator=gen).to(device=device, dtype=t.dtype) for t in got]
            with dispatch.poisoned_outputs():
                got += torch.autograd.grad(got, [ours[k] for k in case.grad], cotangents)
            want += torch.autograd.grad(want, [theirs[k] for k in case.grad], [c.to(ref_dtype) for c in cotangents])
            labels += [f"grad {k}" for k in case.grad]
        tol = case.tol or TOLERANCE[case.dtype]
        for label, g, w in zip(labels, got, want):
            _compare(label, g, w, case.dtype, tol)
    except AssertionError as exc:
        raise AssertionError(f"{case.name} (input seed {seed}): {exc}") from None


def load(modules: Sequence[str] = CASE_MODULES) -> tuple[list[ParityCase], list[Check]]:
    """The cases and checks that ``modules`` (names in this package) list."""
    cases: list[ParityCase] = []
    checks: list[Check] = []
    for name in modules:
        module = importlib.import_module(f"{__package__}.{name}")
        cases += module.CASES
        checks += getattr(module, "CHECKS", [])
    return cases, checks


def run_in_subprocess(modules: Sequence[str] = CASE_MODULES, timeout: float = 600) -> dict[str, dict]:
    """Run every case and check of ``modules`` in a fresh interpreter; {name: {"ok", "detail", "seconds"}}."""
    root = Path(__file__).resolve().parents[len(__package__.split("."))]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", f"{__package__}.parity", *modules], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record.pop("name")] = record
    if proc.returncode != 0 and not results:
        raise RuntimeError(f"parity subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


def main(modules: Sequence[str]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not dispatch.interpret_mode():
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1")
    cases, checks = load(modules or CASE_MODULES)
    jobs = [(c.name, lambda c=c: c.run(device)) for c in checks]
    jobs += [(c.name, lambda c=c: run_case(c, device)) for c in cases]
    for name, job in jobs:
        start = time.perf_counter()
        try:
            job()
            ok, detail = True, ""
        except Exception as exc:  # reported to the pytest process, which fails the test
            ok = False
            detail = str(exc) if isinstance(exc, AssertionError) else traceback.format_exc()
        print(json.dumps({"name": name, "ok": ok, "detail": detail, "seconds": time.perf_counter() - start}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
