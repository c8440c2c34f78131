"""Backend choice for every kernel op: Triton on CUDA, a compiled CPU loop where an op has one, else the
PyTorch reference.

The choice is, in order: the value set by :func:`set_backend` / :func:`use_backend` (process-wide),
else the environment variable ``BLOCKTRAIN_KERNELS`` (``auto``, ``triton``, ``compiled`` or
``reference``), else ``auto``. ``auto`` picks Triton for CUDA tensors of a supported dtype when Triton
imports, the op's compiled CPU loop for CPU tensors when it has one that builds, and the reference
otherwise. ``compiled`` forces the compiled loop of the ops that have one (the others run their
reference); ``reference`` forces the PyTorch reference everywhere. Forcing ``triton`` on CPU tensors is
allowed only under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the parity tests).

Each op calls :func:`announce` with the path it runs, which logs it at INFO once per process.

Ops allocate their Triton outputs with :func:`empty`, so :func:`poisoned_outputs` can fill them with
NaN (or an integer dtype's largest value) and a kernel that leaves an element unwritten fails its
parity test.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = [
    "one_cpu_thread",
    "BACKENDS",
    "ENV_VAR",
    "TRITON_DTYPES",
    "announce",
    "empty",
    "get_backend",
    "interpret_mode",
    "poisoned_outputs",
    "select",
    "set_backend",
    "triton_available",
    "use_backend",
]

BACKENDS = ("auto", "triton", "compiled", "reference")
ENV_VAR = "BLOCKTRAIN_KERNELS"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

log = logging.getLogger(__name__)
_override: str | None = None
_announced: set[tuple[str, str]] = set()
_triton_importable: bool | None = None
_poison = False


def _checked(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} from {source}; expected one of {', '.join(BACKENDS)}")
    return value


def get_backend() -> str:
    """The requested backend: ``auto``, ``triton`` or ``reference``."""
    if _override is not None:
        return _override
    return _checked(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


def set_backend(name: str | None) -> None:
    """Force a backend for the whole process; ``None`` returns to ``$BLOCKTRAIN_KERNELS`` / auto."""
    global _override
    _override = None if name is None else _checked(name, "set_backend()")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available() -> bool:
    """Whether ``import triton`` works here (tried once)."""
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401

            _triton_importable = True
        except Exception:
            _triton_importable = False
    return _triton_importable


def interpret_mode() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (same parsing as Triton)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def select(device: torch.device, dtype: torch.dtype, compiled: Callable[[], bool] | None = None) -> str:
    """``"triton"``, ``"compiled"`` or ``"reference"`` for an op whose inputs live on ``device`` with ``dtype``;
    ``compiled`` tells (building it if needed) whether the op's compiled CPU loop is usable, for ops that have one."""
    requested = get_backend()
    if requested == "reference":
        return "reference"
    on_cuda = device.type == "cuda"
    if requested in ("auto", "compiled") and not on_cuda:
        if compiled is not None and device.type == "cpu" and compiled():
            return "compiled"
        if requested == "compiled" and compiled is not None:
            raise RuntimeError(f"the 'compiled' kernel backend is forced but the compiled loop cannot be built here "
                               f"(see the warning above); set {ENV_VAR}=auto or reference")
        return "reference"
    if requested in ("auto", "compiled"):
        return "triton" if dtype in TRITON_DTYPES and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("the 'triton' kernel backend is forced but Triton cannot be imported; "
                           f"install triton or set {ENV_VAR}=auto")
    if not on_cuda and not (device.type == "cpu" and interpret_mode()):
        raise RuntimeError(f"the 'triton' kernel backend is forced but the inputs are on {device}: Triton needs "
                           "CUDA tensors, or TRITON_INTERPRET=1 (set before Triton is imported) to run CPU "
                           f"tensors through its interpreter; set {ENV_VAR}=auto to use the reference")
    if dtype not in TRITON_DTYPES:
        raise RuntimeError(f"the 'triton' kernel backend is forced but the inputs are {dtype}; "
                           f"the Triton kernels take {', '.join(map(str, TRITON_DTYPES))}")
    return "triton"


def announce(op: str, backend: str) -> None:
    """Log at INFO which path ``op`` runs (``triton``, ``compiled`` or ``reference``), once per process and path."""
    if (op, backend) in _announced or torch.compiler.is_compiling():
        return
    _announced.add((op, backend))
    path = {"triton": "the Triton kernel", "compiled": "the compiled CPU loop"}.get(backend, "the PyTorch reference")
    log.info("kernel %s runs %s (requested backend: %s)", op, path, get_backend())


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer for a Triton kernel; under :func:`poisoned_outputs` it is filled
    with NaN (floating dtypes) or the dtype's largest value (integer dtypes)."""
    if _poison:
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Poison every buffer made by :func:`empty` (parity tests)."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str):
    """One intra-op thread inside the block when on the CPU: loops of thousands of small ops (the GPTQ column
    sweep, the annealer's reference moves) pay more for thread synchronisation than they gain (5-70x slower on a
    busy 2-core host)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
