"""The annealer (reference path) against brute force, and its invariants."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from blocktrain.kernels.qubo_anneal import beta_schedule, qubo_anneal


def brute_force(Q: torch.Tensor, k: int) -> float:
    b = Q.shape[0]
    xs = torch.zeros(math.comb(b, k), b, dtype=torch.float64)
    for row, ones in enumerate(itertools.combinations(range(b), k)):
        xs[row, list(ones)] = 1
    return float(((xs @ Q.double()) * xs).sum(1).min())


def random_qubo(b: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(b, b, generator=gen)
    return (A + A.T) / 2


def test_finds_the_brute_force_optimum_on_small_blocks():
    gen = torch.Generator().manual_seed(0)
    hits, trials = 0, 40
    for seed in range(trials):
        b = int(torch.randint(4, 13, (1,), generator=gen))
        k = int(torch.randint(1, b, (1,), generator=gen))
        Q = random_qubo(b, gen)
        x, energy = qubo_anneal(Q, k, restarts=8, seed=seed)
        assert x.dtype == torch.bool and int(x.sum()) == k
        assert energy == pytest.approx(float(x.double() @ Q.double() @ x.double()), abs=1e-9)
        hits += energy <= brute_force(Q, k) + 1e-6
    assert hits >= 0.95 * trials


def test_cardinality_start_and_determinism():
    gen = torch.Generator().manual_seed(3)
    Q = random_qubo(40, gen)
    x0 = torch.zeros(40, dtype=torch.bool)
    x0[::3] = True
    x, e = qubo_anneal(Q, int(x0.sum()), x0=x0, restarts=3, seed=5, beta_factor=1.5)
    assert int(x.sum()) == int(x0.sum())
    assert e < float(x0.double() @ Q.double() @ x0.double())
    again, e_again = qubo_anneal(Q, 14, x0=x0, restarts=3, seed=5, beta_factor=1.5)
    assert torch.equal(x, again) and e == e_again
    for k in (0, 40):
        x, _ = qubo_anneal(Q, k)
        assert int(x.sum()) == k
    with pytest.raises(ValueError, match="exactly k"):
        qubo_anneal(Q, 3, x0=x0)


def test_beta_schedule_is_geometric_up_to_the_final_beta():
    betas = beta_schedule(1e-3, 100.0, 1.1)
    assert len(betas) == 121 and betas[0] == pytest.approx(1e-3) and betas[-1] < 100 <= betas[-1] * 1.1
    assert torch.allclose(betas[1:] / betas[:-1], torch.tensor(1.1))
