"""Small C/C++ libraries for the CPU kernels, compiled on first use and called through ctypes.

A library is built once with the system compiler (``$CC``, else ``cc``, for C; ``$CXX``, else ``c++``, for C++)
into ``$BLOCKTRAIN_CACHE`` (default ``~/.cache/blocktrain``)/kernels, named by a hash of its source, flags and (for
``-march=native`` builds) this CPU's flags, so a cache shared between machines never runs code built for another.
:func:`load` warns once per library and returns ``None`` without a compiler or when the build fails; callers fall
back to their torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

from blocktrain.trainer.io import atomic_path

__all__ = ["load"]

_COMPILERS = {"c": ("CC", "cc"), "c++": ("CXX", "c++")}


def _cache_dir() -> Path:
    return Path(os.environ.get("BLOCKTRAIN_CACHE", "~/.cache/blocktrain")).expanduser() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler(language: str) -> str:
    var, default = _COMPILERS[language]
    return os.environ.get(var, default)


def _build(stem: str, source: str, flags: list[str], language: str) -> Path | None:
    """The cached library's path, compiled now if missing; ``None`` without a compiler. Raises ``OSError``."""
    host = _cpu_flags() if "-march=native" in flags else ""
    tag = hashlib.sha256((source + " ".join(flags) + host).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{stem}_{tag}.so"
    if target.exists():
        return target
    compiler = shutil.which(_compiler(language))
    if compiler is None:
        return None
    with atomic_path(target) as tmp:  # a concurrent or failed build never leaves a partial library
        proc = subprocess.run([compiler, *flags, "-x", language, "-", "-o", str(tmp)], input=source,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{compiler} failed: {proc.stderr.strip()[-500:]}")
    return target


def load(stem: str, source: str, flags: list[str], what: str, fallback: str, language: str = "c") -> ctypes.CDLL | None:
    """The library ``stem`` built from ``source`` with ``flags`` (compiled now if not cached), or ``None`` with a
    warning naming ``what`` could not be built and the ``fallback`` used instead. Callers cache the result."""
    try:
        path = _build(stem, source, flags, language)
    except OSError as err:  # a failed compile, a read-only cache directory
        warnings.warn(f"could not build {what} ({err}); using {fallback}")
        return None
    if path is None:
        var, default = _COMPILERS[language]
        warnings.warn(f"no C{'++' if language == 'c++' else ''} compiler {_compiler(language)!r} found (${var}, else "
                      f"{default}) to build {what}; using {fallback}")
        return None
    return ctypes.CDLL(str(path))
