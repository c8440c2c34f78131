"""Triton annealer parity with the reference, in a subprocess (interpreter on CPU, or the GPU)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import anneal_parity

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parity_results() -> dict[str, dict]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BLOCKTRAIN_KERNELS")}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "tests.pruning.anneal_parity"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record.pop("name")] = record
    if not results:
        raise RuntimeError(f"parity subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


NAMES = [f"levels_b{c[0]}_k{c[1]}_r{c[2]}_s{c[3]}" for c in anneal_parity.LEVEL_CASES] + ["qubo_anneal_b9"] + \
    ["optimum_b{}_k{}".format(*anneal_parity.OPTIMUM_CASES[0])]


@pytest.mark.parametrize("name", NAMES)
def test_triton_annealer_matches_reference(name, parity_results):
    assert name in parity_results, f"{name} did not report (the subprocess stopped early)"
    assert parity_results[name]["ok"], parity_results[name]["detail"]
