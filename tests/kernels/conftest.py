"""Kernel tests: a clean backend choice per test, and one parity subprocess per session."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blocktrain.kernels import dispatch

from . import parity


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    """Neither the caller's environment nor an earlier test chooses the backend."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


@pytest.fixture(scope="session")
def parity_results() -> dict[str, dict]:
    """Results of every parity case and check, run once in a subprocess (interpreter or GPU)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    return parity.run_in_subprocess()
