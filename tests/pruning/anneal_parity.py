"""Triton annealer vs its reference, run as ``python -m tests.pruning.anneal_parity`` under TRITON_INTERPRET=1
(or on CUDA). Both paths get the same pre-drawn moves, so their whole state must match bit for bit.
Prints one JSON line per case: {"name", "ok", "detail"}."""
from __future__ import annotations

import itertools
import json
import math
import traceback

import torch

from blocktrain.kernels import qubo_anneal as qa

LEVEL_CASES = [  # (b, k, restarts, sweeps, betas)
    (5, 2, 3, 1, (0.05, 0.5, 5.0)),
    (12, 5, 3, 1, (0.1, 1.0, 10.0)),
    (19, 9, 2, 1, (0.2, 2.0, 50.0)),
    (7, 3, 2, 2, (0.5, 5.0)),
]


def brute_force(Q: torch.Tensor, k: int) -> float:
    """The least xᵀQx over every x with exactly k ones (enumerates all C(b, k))."""
    b = Q.shape[0]
    xs = torch.zeros(math.comb(b, k), b, dtype=torch.float64)
    for row, ones in enumerate(itertools.combinations(range(b), k)):
        xs[row, list(ones)] = 1
    return float(((xs @ Q.double()) * xs).sum(1).min())


def random_qubo(b: int, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(b, b, generator=gen)
    return (A + A.T) / 2


OPTIMUM_CASES = [(10, 4, 21), (11, 5, 22), (12, 6, 23)]  # (b, k, seed of Q): C(b, k) ≤ 924 states each


def optimum_case(b: int, k: int, seed: int, backend: str | None = None) -> None:
    """The default schedule (β 1e-3 → 100 ×1.1, the official 2β acceptance, 4 restarts) reaches the
    brute-forced optimum of a random Q."""
    Q = random_qubo(b, torch.Generator().manual_seed(seed))
    best = brute_force(Q, k)
    x, energy = qa.qubo_anneal(Q, k, restarts=4, seed=seed, beta_scale=2.0, backend=backend)
    assert int(x.sum()) == k and abs(energy - float(x.double() @ Q.double() @ x.double())) < 1e-9
    assert abs(energy - best) < 1e-5, f"annealed {energy}, optimum {best}"


def levels_case(device, b, k, restarts, sweeps, betas, other=None) -> None:
    """Run one chunk of levels with the reference and with ``other`` (default: the Triton kernel) from the
    same start and moves; the whole state must match bit for bit."""
    other = other or qa._levels_triton
    gen = torch.Generator().manual_seed(b)
    A = torch.randn(b, b, generator=gen)
    Q = ((A + A.T) / 2).to(device)
    x0 = torch.zeros(b, dtype=torch.bool)
    x0[torch.randperm(b, generator=gen)[:k]] = True
    start = qa._init_state(Q, x0.to(device), restarts)
    slots, thr = qa._draw_moves(torch.Generator(device=device).manual_seed(7), torch.tensor(betas),
                                sweeps * b, restarts, b, k, device)
    states = {}
    for name, levels in (("reference", qa._levels_reference), ("other", other)):
        states[name] = {key: t.clone() for key, t in start.items()}
        levels(Q, Q.diagonal().contiguous(), slots, thr, k, states[name])
    ref, got = states["reference"], states["other"]
    for key in ref:
        assert torch.equal(ref[key], got[key]), f"{key}: reference {ref[key].tolist()}, other {got[key].tolist()}"
    assert not torch.equal(ref["x"], start["x"]), "no move was accepted: the case checks nothing"
    assert (ref["x"].sum(1) == k).all() and (ref["best_x"].sum(1) == k).all()


def _full_case(device) -> None:
    gen = torch.Generator().manual_seed(11)
    A = torch.randn(9, 9, generator=gen)
    Q = ((A + A.T) / 2).to(device)
    got = qa.qubo_anneal(Q, 4, restarts=2, seed=3, beta_factor=2.0, beta_scale=2.0, backend="triton")
    want = qa.qubo_anneal(Q, 4, restarts=2, seed=3, beta_factor=2.0, beta_scale=2.0, backend="reference")
    assert torch.equal(got[0], want[0]) and got[1] == want[1], f"triton {got} vs reference {want}"


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    jobs = [(f"levels_b{c[0]}_k{c[1]}_r{c[2]}_s{c[3]}", lambda c=c: levels_case(device, *c)) for c in LEVEL_CASES]
    jobs.append(("qubo_anneal_b9", lambda: _full_case(device)))
    b, k, seed = OPTIMUM_CASES[0]
    jobs.append((f"optimum_b{b}_k{k}", lambda: optimum_case(b, k, seed, backend="triton")))
    for name, job in jobs:
        try:
            job()
            ok, detail = True, ""
        except Exception:
            ok, detail = False, traceback.format_exc()
        print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    main()
