"""The annealer's compiled CPU loop against the torch reference loop, and its fallback without a compiler."""
from __future__ import annotations

import shutil

import pytest
import torch

from blocktrain.kernels import _qubo_anneal_c
from blocktrain.kernels.qubo_anneal import move_loop, qubo_anneal

from . import anneal_parity


@pytest.fixture
def compiled(fresh_loader):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    assert _qubo_anneal_c.load() is not None, "cc exists but the annealer's C loop did not build"
    assert list((fresh_loader / "kernels").glob("qubo_anneal_*.so"))


@pytest.mark.parametrize("case", anneal_parity.LEVEL_CASES + [(300, 140, 5, 1, (0.01, 0.1, 1.0, 10.0))],
                         ids=lambda c: f"b{c[0]}_k{c[1]}_r{c[2]}_s{c[3]}")
def test_compiled_loop_matches_the_torch_loop_bit_for_bit(compiled, case):
    anneal_parity.levels_case("cpu", *case, other=_qubo_anneal_c.levels_compiled)


def test_qubo_anneal_is_the_same_with_and_without_the_compiled_loop(compiled, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(8, 96, generator=gen)
    Q = G.T @ G / 8 + torch.diag(torch.randn(96, generator=gen))
    with_c = qubo_anneal(Q, 40, restarts=4, seed=2, beta_factor=1.3, beta_scale=2.0)
    monkeypatch.setenv("BLOCKTRAIN_KERNELS", "reference")
    assert move_loop("cpu") == "torch loop"
    without_c = qubo_anneal(Q, 40, restarts=4, seed=2, beta_factor=1.3, beta_scale=2.0)
    assert torch.equal(with_c[0], without_c[0]) and with_c[1] == without_c[1]
    assert int(with_c[0].sum()) == 40


@pytest.mark.parametrize("case", anneal_parity.OPTIMUM_CASES, ids=lambda c: f"b{c[0]}_k{c[1]}")
def test_compiled_loop_reaches_the_brute_force_optimum(compiled, case):
    assert move_loop("cpu") == "compiled C loop"
    anneal_parity.optimum_case(*case)


def test_without_a_working_compiler_the_torch_loop_is_used(fresh_loader, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not build the CPU annealer .*false failed"):
        assert _qubo_anneal_c.load() is None
    assert move_loop("cpu") == "torch loop"
    anneal_parity.optimum_case(*anneal_parity.OPTIMUM_CASES[0])


def test_a_missing_compiler_warns_once(fresh_loader, monkeypatch, recwarn):
    monkeypatch.setenv("BLOCKTRAIN_KERNELS", "reference")  # chosen, not missing: nothing built, no warning
    assert move_loop("cpu") == "torch loop"
    assert not recwarn.list
    monkeypatch.delenv("BLOCKTRAIN_KERNELS")
    monkeypatch.setenv("CC", str(fresh_loader / "no-such-cc"))
    with pytest.warns(UserWarning, match="no C compiler .*no-such-cc.* found"):
        assert _qubo_anneal_c.load() is None
    recwarn.clear()
    assert move_loop("cpu") == "torch loop" and not recwarn.list  # once per process


def test_an_unwritable_cache_falls_back_with_a_warning(fresh_loader, monkeypatch):
    blocker = fresh_loader / "file"
    blocker.write_text("")
    monkeypatch.setenv("BLOCKTRAIN_CACHE", str(blocker))  # kernels/ cannot be made under a file
    with pytest.warns(UserWarning, match="could not build the CPU annealer"):
        assert _qubo_anneal_c.load() is None
