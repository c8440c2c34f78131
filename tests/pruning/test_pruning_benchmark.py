"""benchmarks/pruning.py: the annealer timing names the loop that actually ran; the seed summary."""
from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("pruning_benchmark", ROOT / "benchmarks" / "pruning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_small_block(bench, capsys) -> tuple[dict, str]:
    import torch

    result = bench.time_annealer(argparse.Namespace(anneal_block=48, restarts=2), torch.device("cpu"))
    return result, capsys.readouterr().out


def test_annealer_timing_names_the_compiled_loop_when_it_loaded(bench, fresh_loader, capsys):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    result, out = time_small_block(bench, capsys)
    assert list(result["seconds"]) == ["cpu, compiled C loop", "cpu, torch loop"]
    assert "(cpu, compiled C loop)" in out and "(cpu, torch loop)" in out


def test_annealer_timing_without_a_compiler_says_the_torch_loop_ran(bench, fresh_loader, monkeypatch, tmp_path,
                                                                    capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="no C compiler"):
        result, out = time_small_block(bench, capsys)
    assert list(result["seconds"]) == ["cpu, torch loop"]
    assert "compiled C loop)" not in out and "already timed (no compiled C loop here)" in out


def test_summary_is_mean_and_sample_sd_over_seeds(bench, capsys):
    run = {"ppl": 1.0, "seconds": 2.0, "peak_gb": 1.0}
    results = {"methods": {"dense": [{**run, "seed": None}],
                           "SparseGPT": [{**run, "seed": s, "ppl": p} for s, p in enumerate((50.0, 52.0, 57.0))]},
               "icbs": {s: {"curve": [{"epochs": 0, **run, "ppl": 70.0 + s}]} for s in range(3)}}
    summary = bench.summarize(results)
    assert set(summary) == {"SparseGPT", "iCBS, 0 epochs"}
    assert summary["SparseGPT"]["ppl_mean"] == pytest.approx(53.0)
    assert summary["SparseGPT"]["ppl_sd"] == pytest.approx(((9 + 1 + 16) / 2) ** 0.5)
    assert summary["iCBS, 0 epochs"]["n"] == 3 and "| SparseGPT | 3 | 53.00 ± 3.61 |" in capsys.readouterr().out
