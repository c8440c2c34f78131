"""The annealer (reference path) against brute force, and its invariants."""
from __future__ import annotations

import math

import pytest
import torch

from blocktrain.kernels import qubo_anneal as qa
from blocktrain.kernels.qubo_anneal import beta_schedule, qubo_anneal

from . import anneal_parity
from .anneal_parity import brute_force, random_qubo


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


@pytest.mark.parametrize("case", anneal_parity.OPTIMUM_CASES, ids=lambda c: f"b{c[0]}_k{c[1]}")
def test_torch_loop_reaches_the_brute_force_optimum(case, monkeypatch):
    assert qa.move_loop("cpu", "reference") == "torch loop"
    anneal_parity.optimum_case(*case, backend="reference")


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


def test_beta_scale_sets_the_acceptance_probability(monkeypatch):
    """b = 2, k = 1, one level, from x = [1, 0] with Q = diag(0, d): the first move goes uphill by d (accepted with
    p = exp(−s·β·d)); the second undoes it, or, after a refusal, tries it again. So a chain ends on [0, 1] with
    probability (1 − p)·p."""
    ends = []
    reference = qa._levels_reference

    def spy(Q, diag, slots, thr, k, st):
        reference(Q, diag, slots, thr, k, st)
        ends.append(float(st["x"][:, 1].double().mean()))

    monkeypatch.setattr(qa, "_levels_reference", spy)
    monkeypatch.setenv("BLOCKTRAIN_KERNELS", "reference")  # the spied torch loop, not the compiled one
    beta, d = 0.5, 2 * math.log(2.0)  # β·d = ln 4
    Q = torch.diag(torch.tensor([0.0, d]))
    for scale in (1.0, 2.0):
        qubo_anneal(Q, 1, restarts=20000, seed=0, beta0=beta, beta1=beta * 1.05, beta_scale=scale,
                    backend="reference")
        p = math.exp(-scale * beta * d)  # 1/4, then 1/16
        assert ends[-1] == pytest.approx((1 - p) * p, abs=0.01), scale


def test_beta_scale_2_is_the_schedule_at_twice_beta():
    gen = torch.Generator().manual_seed(8)
    Q = random_qubo(40, gen)
    scaled = qubo_anneal(Q, 17, restarts=3, seed=1, beta0=0.05, beta1=50.0, beta_factor=1.5, beta_scale=2.0)
    doubled = qubo_anneal(Q, 17, restarts=3, seed=1, beta0=0.1, beta1=100.0, beta_factor=1.5)
    plain = qubo_anneal(Q, 17, restarts=3, seed=1, beta0=0.05, beta1=50.0, beta_factor=1.5)
    assert torch.equal(scaled[0], doubled[0]) and scaled[1] == doubled[1]
    assert not torch.equal(scaled[0], plain[0])  # the factor changes the trajectory
    with pytest.raises(ValueError, match="beta_scale"):
        qubo_anneal(Q, 17, beta_scale=0.0)
