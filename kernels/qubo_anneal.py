"""Batched simulated annealing for cardinality-constrained QUBOs: min xᵀQx  s.t.  Σx = k, x ∈ {0,1}ᵇ.

Every move swaps a 1 and a 0, so Σx never changes. One sweep visits positions i = 0..b-1 in order; at
position i the partner j is drawn uniformly from the opposite set (the zeros if x_i = 1, the ones
otherwise) and the swap is accepted by the Metropolis rule with probability min(1, exp(−s·β·ΔE)),
s = ``beta_scale``. β runs geometrically from ``beta0`` (×``beta_factor`` per level, ``sweeps`` sweeps
per level) while β < ``beta1``. (The official ``sa-card`` anneals an Ising energy twice the QUBO's, so
it accepts with exp(−2β·ΔE) on the QUBO: s = 2 reproduces it.) A restart stops early after a level in which it accepted no energy-changing move (as the
official ``sa-card`` solver does). ``restarts`` independent chains run in parallel from the same start;
the best state seen by any chain is returned.

Bookkeeping per chain: the field v = 2Qx (so a swap's ΔE costs O(1) and its update O(b)), and a
permutation ``perm`` whose first k entries are the positions of the ones and the rest those of the
zeros (``pos`` is its inverse), so a uniform partner is ``perm[k + ⌊U·(b-k)⌋]`` or ``perm[⌊U·k⌋]``.

Both paths consume the same pre-drawn moves (a partner slot and a Metropolis threshold per move and
chain, drawn level-chunk by level-chunk from a generator seeded with ``seed``), so the torch reference
(the CPU path) and the Triton kernel (CUDA; one program per chain, its state held in registers) follow
identical trajectories. On the CPU the reference's move loop runs compiled from C when a C compiler is
available (``_qubo_anneal_c``, the dispatch's ``compiled`` backend; same float32 operations, bit-identical
state, 6.3x faster on a 4096-weight block in benchmarks/pruning.py); the torch loop (``reference``) is the
fallback and the definition that the parity tests check against.
The path follows ``blocktrain.kernels.dispatch`` (``$BLOCKTRAIN_KERNELS``, ``set_backend``), or ``backend``
(``auto`` | ``triton`` | ``compiled`` | ``reference``) per call; :func:`move_loop` names the loop a call would run.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from blocktrain.kernels import _qubo_anneal_c, dispatch

__all__ = ["qubo_anneal", "beta_schedule", "move_loop"]

try:  # Triton is optional: the torch reference is the CPU path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton absent
    triton = None


def beta_schedule(beta0: float = 1e-3, beta1: float = 100.0, beta_factor: float = 1.1) -> torch.Tensor:
    """The inverse temperatures β0, β0·f, β0·f², … below ``beta1`` (fp32, CPU)."""
    if not (beta0 > 0 and beta1 > beta0 and beta_factor > 1):
        raise ValueError(f"need 0 < beta0 < beta1 and beta_factor > 1, got {beta0}, {beta1}, {beta_factor}")
    betas, beta = [], beta0
    while beta < beta1:
        betas.append(beta)
        beta *= beta_factor
    return torch.tensor(betas, dtype=torch.float32)


def _init_state(Q: torch.Tensor, x0: torch.Tensor, restarts: int) -> dict[str, torch.Tensor]:
    b = Q.shape[0]
    xf = x0.to(torch.float32)
    order = torch.cat([torch.nonzero(x0).flatten(), torch.nonzero(~x0).flatten()])
    u0 = Q @ xf
    energy = (xf * u0).sum()
    x = x0.to(torch.int8).expand(restarts, b).contiguous()
    return {
        "x": x,
        "v": (2.0 * u0).expand(restarts, b).contiguous(),
        "perm": order.to(torch.int32).expand(restarts, b).contiguous(),
        "pos": torch.argsort(order).to(torch.int32).expand(restarts, b).contiguous(),
        "best_x": x.clone(),
        "E": energy.expand(restarts).contiguous(),
        "best_E": energy.expand(restarts).contiguous(),
        "active": torch.ones(restarts, dtype=torch.int32, device=Q.device),
    }


def _draw_moves(gen, betas, n_moves: int, restarts: int, b: int, k: int, device):
    """Pre-draw one level chunk: partner slots [L, n, R, 2] and Metropolis thresholds ``thr`` [L, n, R].

    ``slots[..., 1]`` is the place in ``perm`` of a uniform zero (used when x_i = 1), ``slots[..., 0]`` that
    of a uniform one. A move is accepted iff ΔE < thr = -log(U)/β, i.e. U < exp(-βΔE) (always when ΔE ≤ 0).
    """
    rand = torch.rand((betas.shape[0], n_moves, restarts, 2), generator=gen, device=device)
    nz = b - k
    slots = torch.stack([(rand[..., 0] * k).to(torch.int32).clamp(max=k - 1),
                         k + (rand[..., 0] * nz).to(torch.int32).clamp(max=nz - 1)], dim=-1)
    thr = -torch.log(rand[..., 1]) / betas.to(device)[:, None, None]
    return slots.contiguous(), thr.contiguous()


def _levels_reference(Q, diag, slots, thr, k: int, st: dict[str, torch.Tensor]) -> None:
    """Run one chunk of levels on every chain, in place on ``st`` (the reference; vectorised over chains,
    the O(b) updates restricted to the chains that accepted their move)."""
    with dispatch.one_cpu_thread(Q.device):
        _levels_reference_impl(Q, diag, slots, thr, k, st)


def _levels_reference_impl(Q, diag, slots, thr, k: int, st: dict[str, torch.Tensor]) -> None:
    b = Q.shape[0]
    R = st["x"].shape[0]
    x = st["x"].bool().flatten()
    xv = x.view(R, b)
    v, E, best_E, best_x = st["v"].view(-1), st["E"], st["best_E"], st["best_x"]
    perm, pos = st["perm"].long().flatten(), st["pos"].long().flatten()
    active = st["active"].bool()
    ro = torch.arange(R, device=Q.device) * b
    Q2 = 2.0 * Q
    Q2f = Q2.flatten()
    idx = torch.arange(b, device=Q.device)[:, None].expand(b, R)
    for lev in range(slots.shape[0]):
        if not bool(active.any()):
            break
        lthr = torch.where(active, thr[lev], float("-inf"))
        flat_slots = slots[lev].long() + ro[:, None]
        changed = torch.zeros_like(active)
        for t in range(slots.shape[1]):
            i = t % b
            xi = xv[:, i]
            j = perm.take(torch.where(xi, flat_slots[t, :, 1], flat_slots[t, :, 0]))
            p = torch.where(xi, idx[i], j)
            q = torch.where(xi, j, idx[i])
            dE = diag.take(p) + diag.take(q) - Q2f.take(p * b + q) - v.take(p + ro) + v.take(q + ro)
            acc = dE < lthr[t]
            if not bool(acc.any()):
                continue
            r = torch.nonzero(acc).flatten()
            pr, qr, ror = p[r], q[r], ro[r]
            fp, fq = pr + ror, qr + ror
            x[fp] = False
            x[fq] = True
            v.view(R, b).index_add_(0, r, Q2.index_select(0, qr) - Q2.index_select(0, pr))
            a, c = pos[fp], pos[fq]
            perm[a + ror] = qr
            perm[c + ror] = pr
            pos[fp] = c
            pos[fq] = a
            dEr = dE[r]
            E.index_add_(0, r, dEr)
            changed[r[dEr != 0.0]] = True
            better = torch.nonzero(E < best_E).flatten()
            if better.numel():
                best_E[better] = E[better]
                best_x[better] = xv[better].to(torch.int8)
        active &= changed
    st["x"].copy_(xv)
    st["perm"].copy_(perm.view(R, b))
    st["pos"].copy_(pos.view(R, b))
    st["active"].copy_(active)


if triton is not None:

    @triton.jit
    def _anneal_kernel(Q, diag, slots, thr, x_ptr, v_ptr, perm_ptr, pos_ptr, bx_ptr, E_ptr, bE_ptr, act_ptr,
                       b, n_levels, n_moves, R, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < b
        row = r * b
        x = tl.load(x_ptr + row + offs, mask=valid, other=0).to(tl.int32)
        v = tl.load(v_ptr + row + offs, mask=valid, other=0.0)
        perm = tl.load(perm_ptr + row + offs, mask=valid, other=0)
        pos = tl.load(pos_ptr + row + offs, mask=valid, other=0)
        bx = tl.load(bx_ptr + row + offs, mask=valid, other=0).to(tl.int32)
        E = tl.load(E_ptr + r)
        bE = tl.load(bE_ptr + r)
        active = tl.load(act_ptr + r)
        for lev in range(n_levels):
            changed = active * 0
            for t in range(n_moves):
                i = t % b
                xi = tl.sum(tl.where(offs == i, x, 0), axis=0)
                mv = (lev * n_moves + t) * R + r
                m = tl.load(slots + 2 * mv + xi)
                j = tl.sum(tl.where(offs == m, perm, 0), axis=0)
                p = tl.where(xi == 1, i, j)
                q = tl.where(xi == 1, j, i)
                vp = tl.sum(tl.where(offs == p, v, 0.0), axis=0)
                vq = tl.sum(tl.where(offs == q, v, 0.0), axis=0)
                dE = tl.load(diag + p) + tl.load(diag + q) - 2.0 * tl.load(Q + p * b + q) - vp + vq
                acc = (active != 0) & (dE < tl.load(thr + mv))
                rq = tl.load(Q + q * b + offs, mask=valid & acc, other=0.0)
                rp = tl.load(Q + p * b + offs, mask=valid & acc, other=0.0)
                v = tl.where(acc, v + 2.0 * (rq - rp), v)
                x = tl.where(acc & (offs == p), 0, x)
                x = tl.where(acc & (offs == q), 1, x)
                a = tl.sum(tl.where(offs == p, pos, 0), axis=0)
                c = tl.sum(tl.where(offs == q, pos, 0), axis=0)
                perm = tl.where(acc & (offs == a), q, perm)
                perm = tl.where(acc & (offs == c), p, perm)
                pos = tl.where(acc & (offs == p), c, pos)
                pos = tl.where(acc & (offs == q), a, pos)
                E = tl.where(acc, E + dE, E)
                changed = changed | (acc & (dE != 0.0)).to(tl.int32)
                better = acc & (E < bE)
                bE = tl.where(better, E, bE)
                bx = tl.where(better, x, bx)
            active = active * changed
        tl.store(x_ptr + row + offs, x.to(tl.int8), mask=valid)
        tl.store(v_ptr + row + offs, v, mask=valid)
        tl.store(perm_ptr + row + offs, perm, mask=valid)
        tl.store(pos_ptr + row + offs, pos, mask=valid)
        tl.store(bx_ptr + row + offs, bx.to(tl.int8), mask=valid)
        tl.store(E_ptr + r, E)
        tl.store(bE_ptr + r, bE)
        tl.store(act_ptr + r, active)


def _levels_triton(Q, diag, slots, thr, k: int, st: dict[str, torch.Tensor]) -> None:
    """Run one chunk of levels on every chain with the Triton kernel, in place on ``st``."""
    b = Q.shape[0]
    R = st["x"].shape[0]
    block = max(16, triton.next_power_of_2(b))
    _anneal_kernel[(R,)](Q, diag, slots, thr, st["x"], st["v"], st["perm"], st["pos"], st["best_x"], st["E"],
                         st["best_E"], st["active"], b, slots.shape[0], slots.shape[1], R, BLOCK=block,
                         num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16))


def _pick_backend(device: torch.device, backend: str | None) -> str:
    """``"triton"``, ``"compiled"`` or ``"reference"``: the shared dispatch's choice, or ``backend`` when given."""
    with dispatch.use_backend(backend) if backend is not None else contextlib.nullcontext():
        return dispatch.select(device, torch.float32, compiled=_qubo_anneal_c.available)


def _move_loop(device: torch.device, backend: str) -> tuple[str, Callable]:
    """The name and function of the move loop for a picked ``backend``."""
    return {"triton": ("triton", _levels_triton), "compiled": ("compiled C loop", _qubo_anneal_c.levels_compiled),
            "reference": ("torch loop", _levels_reference)}[backend]


def move_loop(device: torch.device | str = "cpu", backend: str | None = None) -> str:
    """Which move loop :func:`qubo_anneal` runs on ``device``: ``"triton"``, ``"compiled C loop"`` or ``"torch loop"``
    (building the C loop now if it is the CPU's and not built yet)."""
    device = torch.device(device)
    return _move_loop(device, _pick_backend(device, backend))[0]


_LEVELS_PER_CHUNK = 8


def _anneal(Q: torch.Tensor, x0: torch.Tensor, k: int, restarts: int, seed: int, beta0: float, beta1: float,
            beta_factor: float, beta_scale: float, sweeps: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    b = Q.shape[0]
    if k in (0, b):
        return x0.clone(), (x0.double() @ Q.double() @ x0.double())
    Q = Q.to(torch.float32)
    Q = (0.5 * (Q + Q.T)).contiguous()
    diag = Q.diagonal().contiguous()
    st = _init_state(Q, x0, restarts)
    betas = beta_schedule(beta0, beta1, beta_factor) * beta_scale
    levels = _move_loop(Q.device, backend)[1]
    gen = torch.Generator(device=Q.device).manual_seed(seed)
    for start in range(0, betas.shape[0], _LEVELS_PER_CHUNK):
        if not bool(st["active"].any()):
            break
        slots, thr = _draw_moves(gen, betas[start:start + _LEVELS_PER_CHUNK], sweeps * b, restarts, b, k, Q.device)
        levels(Q, diag, slots, thr, k, st)
    bx = st["best_x"].double()
    energies = ((bx @ Q.double()) * bx).sum(1)
    best = int(torch.argmin(energies))
    return st["best_x"][best].bool(), energies[best]


@torch.library.custom_op("blocktrain::qubo_anneal", mutates_args=())
def _qubo_anneal_op(Q: torch.Tensor, x0: torch.Tensor, k: int, restarts: int, seed: int, beta0: float,
                    beta1: float, beta_factor: float, beta_scale: float, sweeps: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _anneal(Q, x0, k, restarts, seed, beta0, beta1, beta_factor, beta_scale, sweeps, backend)


@_qubo_anneal_op.register_fake
def _(Q, x0, k, restarts, seed, beta0, beta1, beta_factor, beta_scale, sweeps, backend):
    return x0.new_empty(x0.shape, dtype=torch.bool), Q.new_empty((), dtype=torch.float64)


def qubo_anneal(Q: torch.Tensor, k: int, *, x0: torch.Tensor | None = None, restarts: int = 20, seed: int = 0,
                beta0: float = 1e-3, beta1: float = 100.0, beta_factor: float = 1.1, beta_scale: float = 1.0,
                sweeps: int = 1, backend: str | None = None) -> tuple[torch.Tensor, float]:
    """Minimise xᵀQx over x ∈ {0,1}ᵇ with exactly ``k`` ones by simulated annealing.

    ``x0`` (bool, ``k`` ones; default: the first ``k`` positions) is every chain's start. A move is accepted
    with probability min(1, exp(−beta_scale·β·ΔE)) at each β of the schedule (``beta_scale=2``: the official
    ``sa-card``'s acceptance on the QUBO energy). Returns the best state (bool ``[b]``, exactly ``k`` ones) and
    its energy xᵀQx (float64, recomputed exactly).
    """
    if Q.dim() != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"Q must be square, got shape {tuple(Q.shape)}")
    b = Q.shape[0]
    if not 0 <= k <= b:
        raise ValueError(f"k={k} outside [0, {b}]")
    if x0 is None:
        x0 = torch.arange(b, device=Q.device) < k
    x0 = x0.to(device=Q.device, dtype=torch.bool).flatten()
    if x0.numel() != b or int(x0.sum()) != k:
        raise ValueError(f"x0 must have {b} entries with exactly k={k} ones")
    if restarts < 1 or sweeps < 1:
        raise ValueError("restarts and sweeps must be >= 1")
    if not beta_scale > 0:
        raise ValueError(f"beta_scale must be > 0, got {beta_scale}")
    backend = _pick_backend(Q.device, backend)
    dispatch.announce("qubo_anneal", backend)
    x, energy = _qubo_anneal_op(Q, x0, k, restarts, seed, beta0, beta1, beta_factor, beta_scale, sweeps, backend)
    return x, float(energy)
