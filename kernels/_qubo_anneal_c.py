"""The annealer's move loop compiled from C for the CPU, called through ctypes.

The torch reference issues ~25 small tensor ops per move (≈150 µs), so one 4096-weight block at the
paper's schedule (≈120 levels × 4096 moves × 20 chains) takes over a minute. This loop does the same
arithmetic per chain in plain C: same pre-drawn moves, same float32 operations in the same order
(``-ffp-contract=off``: no fused multiply-adds), so its state matches the reference bit for bit (tested).

The library is built once with the system C compiler by ``_cbuild`` (cached under ``$BLOCKTRAIN_CACHE``/kernels).
Without a compiler (or when the build fails) :func:`load` warns once and returns ``None``, and callers use the torch reference loop; the kernel dispatch's ``BLOCKTRAIN_KERNELS=reference`` chooses that
loop without building anything (``compiled`` is the dispatch's name for this loop).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from blocktrain.kernels import _cbuild

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* One chunk of levels for every chain; layouts as in qubo_anneal.py: slots [L, n, R, 2], thr [L, n, R],
   per-chain rows of b entries for x, v, perm, pos, best_x; Q is b x b, row-major. Products by 2 are exact,
   so 2.0f * Q[..] rounds exactly as the reference's pre-doubled 2Q. */
void anneal_levels(const float *Q, const float *diag, const int32_t *slots, const float *thr,
                   int8_t *x_all, float *v_all, int32_t *perm_all, int32_t *pos_all, int8_t *bx_all,
                   float *E_all, float *bE_all, int32_t *active, int64_t b, int64_t L, int64_t n, int64_t R) {
    for (int64_t r = 0; r < R; ++r) {
        int8_t *x = x_all + r * b, *bx = bx_all + r * b;
        float *v = v_all + r * b;
        int32_t *perm = perm_all + r * b, *pos = pos_all + r * b;
        float E = E_all[r], bE = bE_all[r];
        for (int64_t lev = 0; lev < L && active[r]; ++lev) {
            int changed = 0;
            for (int64_t t = 0; t < n; ++t) {
                int64_t i = t % b, mv = (lev * n + t) * R + r;
                int xi = x[i] != 0;
                int64_t j = perm[slots[2 * mv + xi]];
                int64_t p = xi ? i : j, q = xi ? j : i;
                float dE = diag[p] + diag[q];
                dE = dE - 2.0f * Q[p * b + q];
                dE = dE - v[p];
                dE = dE + v[q];
                if (!(dE < thr[mv])) continue;
                const float *rq = Q + q * b, *rp = Q + p * b;
                for (int64_t c = 0; c < b; ++c) { float d = 2.0f * rq[c] - 2.0f * rp[c]; v[c] = v[c] + d; }
                x[p] = 0;
                x[q] = 1;
                int32_t a = pos[p], c = pos[q];
                perm[a] = (int32_t)q;
                perm[c] = (int32_t)p;
                pos[p] = c;
                pos[q] = a;
                E = E + dE;
                if (dE != 0.0f) changed = 1;
                if (E < bE) { bE = E; memcpy(bx, x, (size_t)b); }
            }
            active[r] = changed;
        }
        E_all[r] = E;
        bE_all[r] = bE;
    }
}
"""
_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = _cbuild.load("qubo_anneal", _SOURCE, _FLAGS, "the CPU annealer", "the torch reference loop (slower)")
    if lib is not None:
        lib.anneal_levels.restype = None
        lib.anneal_levels.argtypes = [ctypes.c_void_p] * 12 + [ctypes.c_int64] * 4
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or ``None`` where no C compiler works."""
    return _library()


def available() -> bool:
    """Whether the compiled loop can run here (building it on first use)."""
    return load() is not None


def levels_compiled(Q, diag, slots, thr, k: int, st: dict[str, torch.Tensor]) -> None:
    """Run one chunk of levels on every chain with the C loop, in place on ``st`` (CPU tensors)."""
    lib = load()
    assert lib is not None, "levels_compiled needs load() to have succeeded"
    b = Q.shape[0]
    R = st["x"].shape[0]
    tensors = [Q.contiguous(), diag.contiguous(), slots.contiguous(), thr.contiguous(), st["x"], st["v"], st["perm"],
               st["pos"], st["best_x"], st["E"], st["best_E"], st["active"]]
    expected = [torch.float32, torch.float32, torch.int32, torch.float32, torch.int8, torch.float32, torch.int32,
                torch.int32, torch.int8, torch.float32, torch.float32, torch.int32]
    for t, dtype in zip(tensors, expected):
        assert t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous(), (t.device, t.dtype)
    lib.anneal_levels(*[t.data_ptr() for t in tensors], b, slots.shape[0], slots.shape[1], R)
