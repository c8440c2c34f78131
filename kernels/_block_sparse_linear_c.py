"""``block_sparse_linear``'s CPU kernel: C++ compiled on first use (``_cbuild``, ``-O3 -march=native -fopenmp``),
called through ctypes on fp32 CPU tensors. Block sides must be multiples of 16 (one 16-float vector).

Two loops cover the three products of y = x·Wᵀ:

- ``run_mm`` (y, and the input gradient g·W): threads take macro tiles of tokens; a tile's rows of x are packed
  k-major in micro tiles of MR rows (zero-padded past the last token) and kept in L2 while every output block row
  sweeps over them. For one micro tile and block row, an MR × 16·NV register tile accumulates outer products (a
  broadcast x element times a contiguous block row) over that row's stored blocks only, starting from the bias, and
  is stored once. y reads the blocks transposed (copied once per call); g·W walks W's block columns as rows (the
  column layout comes from a counting sort of the row layout) and reads the blocks in place.
- ``grad`` (the stored blocks' gradient gᵀ·x): each thread owns a contiguous run of blocks and walks the tokens
  in chunks that stay in L2; per block, register tiles of rows × 16·NV columns accumulate over the chunk's tokens
  and are added into the block.

Sums run in a different order from the dense matmul (same products, fused multiply-adds): results match the masked
dense linear to fp32 rounding, not bit for bit.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from blocktrain.kernels import _cbuild

__all__ = ["available", "forward", "backward_x", "backward_values"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 ld(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* acc[i][v] += a[i] * b[16 v ..]: one rank-1 update of an MR x 16 NV register tile. */
template <int MR, int NV>
static inline __attribute__((always_inline)) void rank1(v16 (&acc)[MR][NV], const float *a, const float *b) {
    v16 w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = ld(b + 16 * v);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
        v16 s = a[i] - (v16){};
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += s * w[v];
    }
}

/* y rows [0, rows) of one micro tile, output columns [o0, o0 + 16 NV) of block row j0..j1:
   acc[i] = bias + sum_j sum_k xp[(idx[j] kb + k) MR + i] * p[(blk[j] kb + k) ro + o0 ..] (blk null: j). */
template <int MR, int NV>
static void micro_mm(const float *__restrict xp, const float *__restrict p, int64_t j0, int64_t j1,
                     const int64_t *__restrict idx, const int64_t *__restrict blk, int64_t kb, int64_t ro, int64_t o0,
                     const float *bias, float *__restrict y, int64_t ldy, int64_t rows) {
    v16 acc[MR][NV];
    for (int v = 0; v < NV; ++v) {
        v16 b0 = bias ? ld(bias + o0 + 16 * v) : (v16){};
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) acc[i][v] = b0;
    }
    for (int64_t j = j0; j < j1; ++j) {
        const float *a = xp + idx[j] * kb * MR;
        const float *b = p + (blk ? blk[j] : j) * kb * ro + o0;
        for (int64_t k = 0; k < kb; ++k, a += MR, b += ro) rank1<MR, NV>(acc, a, b);
    }
    for (int i = 0; i < MR && i < rows; ++i)
        for (int v = 0; v < NV; ++v) st(y + i * ldy + o0 + 16 * v, acc[i][v]);
}

template <int MR, int NV>
static void mm(const float *x, int64_t m, int64_t kdim, const float *p, const int64_t *ptr, const int64_t *idx,
               const int64_t *blk, int64_t nrows, int64_t kb, int64_t ro, const float *bias, float *y, int threads,
               int64_t l2) {
    const int64_t ldy = nrows * ro;
    int64_t mc = l2 / (kdim * (int64_t)sizeof(float)) / MR * MR;
    if (mc < MR) mc = MR;
    const int64_t tiles = (m + mc - 1) / mc;
#pragma omp parallel num_threads(threads)
    {
        float *buf = (float *)aligned_alloc(64, (size_t)(mc * kdim * sizeof(float)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tiles; ++t) {
            const int64_t m0 = t * mc, mt = m - m0 < mc ? m - m0 : mc, micro = (mt + MR - 1) / MR;
            for (int64_t u = 0; u < micro; ++u) {
                float *dst = buf + u * kdim * MR;
                for (int64_t i = 0; i < MR; ++i) {
                    const int64_t row = u * MR + i;
                    if (row < mt) {
                        const float *src = x + (m0 + row) * kdim;
                        for (int64_t k = 0; k < kdim; ++k) dst[k * MR + i] = src[k];
                    } else {
                        for (int64_t k = 0; k < kdim; ++k) dst[k * MR + i] = 0.0f;
                    }
                }
            }
            for (int64_t r = 0; r < nrows; ++r)
                for (int64_t o0 = 0; o0 < ro; o0 += 16 * NV)
                    for (int64_t u = 0; u < micro; ++u)
                        micro_mm<MR, NV>(buf + u * kdim * MR, p, ptr[r], ptr[r + 1], idx, blk, kb, ro, o0,
                                         bias ? bias + r * ro : 0, y + (m0 + u * MR) * ldy + r * ro, ldy,
                                         mt - u * MR);
        }
        free(buf);
    }
}

/* y (m, nrows ro) = x (m, kdim) times the blocks p[blk[j]] (kb, ro) of each block row (ptr, idx), + bias. */
static void run_mm(const float *x, int64_t m, int64_t kdim, const float *p, const int64_t *ptr, const int64_t *idx,
                   const int64_t *blk, int64_t nrows, int64_t kb, int64_t ro, const float *bias, float *y,
                   int threads, int64_t l2) {
    if (ro % 32 == 0) mm<12, 2>(x, m, kdim, p, ptr, idx, blk, nrows, kb, ro, bias, y, threads, l2);
    else mm<24, 1>(x, m, kdim, p, ptr, idx, blk, nrows, kb, ro, bias, y, threads, l2);
}

/* y (m, nrows r) = x (m, kdim) W^T + bias, W's blocks v (nnz, r, c) in row-major BSR order (crow, col). */
extern "C" void bsr_forward(const float *x, int64_t m, int64_t kdim, const float *v, const int64_t *crow,
                            const int64_t *col, int64_t nrows, int64_t r, int64_t c, const float *bias, float *y,
                            int threads, int64_t l2) {
    const int64_t nnz = crow[nrows];
    float *p = (float *)malloc((size_t)(nnz * r * c * sizeof(float)) + 64);
#pragma omp parallel for num_threads(threads)
    for (int64_t j = 0; j < nnz; ++j)  /* block j as (c, r): its row k holds W[rows of the block, column k] */
        for (int64_t i = 0; i < r; ++i)
            for (int64_t k = 0; k < c; ++k) p[(j * c + k) * r + i] = v[(j * r + i) * c + k];
    run_mm(x, m, kdim, p, crow, col, 0, nrows, c, r, bias, y, threads, l2);
    free(p);
}

/* gx (m, ncols c) = g (m, nrows r) W: the block columns of W as rows, blocks read in place. */
extern "C" void bsr_backward_x(const float *g, int64_t m, const float *v, const int64_t *crow, const int64_t *col,
                               int64_t nrows, int64_t ncols, int64_t r, int64_t c, float *gx, int threads,
                               int64_t l2) {
    const int64_t nnz = crow[nrows];
    int64_t *ccol = (int64_t *)calloc((size_t)(ncols + 1), sizeof(int64_t));
    int64_t *blk = (int64_t *)malloc((size_t)(nnz + 1) * sizeof(int64_t));
    int64_t *rows = (int64_t *)malloc((size_t)(nnz + 1) * sizeof(int64_t));
    for (int64_t j = 0; j < nnz; ++j) ++ccol[col[j] + 1];
    for (int64_t q = 0; q < ncols; ++q) ccol[q + 1] += ccol[q];
    int64_t *fill = (int64_t *)malloc((size_t)(ncols + 1) * sizeof(int64_t));
    memcpy(fill, ccol, (size_t)(ncols + 1) * sizeof(int64_t));
    for (int64_t b = 0; b < nrows; ++b)  /* stable: within a column, blocks by row */
        for (int64_t j = crow[b]; j < crow[b + 1]; ++j) {
            const int64_t at = fill[col[j]]++;
            blk[at] = j;
            rows[at] = b;
        }
    run_mm(g, m, nrows * r, v, ccol, rows, blk, ncols, r, c, 0, gx, threads, l2);
    free(fill);
    free(rows);
    free(blk);
    free(ccol);
}

template <int MR, int NV>
static void micro_grad(const float *__restrict g, int64_t ldg, const float *__restrict x, int64_t ldx, int64_t n,
                       float *__restrict out, int64_t ldo) {
    v16 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = ld(out + i * ldo + 16 * v);
    for (int64_t t = 0; t < n; ++t, g += ldg, x += ldx) rank1<MR, NV>(acc, g, x);
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) st(out + i * ldo + 16 * v, acc[i][v]);
}

template <int MR, int NV>
static void grad(const float *g, const float *x, int64_t m, int64_t n, int64_t kdim, const int64_t *brow,
                 const int64_t *col, int64_t nnz, int64_t r, int64_t c, float *gv, int threads, int64_t l2) {
    memset(gv, 0, (size_t)(nnz * r * c * sizeof(float)));
    int64_t chunk = l2 / ((n + kdim) * (int64_t)sizeof(float));
    if (chunk < 16) chunk = 16;
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t b0 = nnz * me / nt, b1 = nnz * (me + 1) / nt;
        for (int64_t t0 = 0; t0 < m; t0 += chunk) {
            const int64_t len = m - t0 < chunk ? m - t0 : chunk;
            for (int64_t b = b0; b < b1; ++b)
                for (int64_t i0 = 0; i0 < r; i0 += MR)
                    for (int64_t c0 = 0; c0 < c; c0 += 16 * NV)
                        micro_grad<MR, NV>(g + t0 * n + brow[b] * r + i0, n, x + t0 * kdim + col[b] * c + c0, kdim,
                                           len, gv + (b * r + i0) * c + c0, c);
        }
    }
}

/* gv (nnz, r, c): block b (row brow, column col[b]) = sum over tokens of g[:, brow r ..]^T x[:, col[b] c ..]. */
extern "C" void bsr_grad(const float *g, const float *x, int64_t m, int64_t kdim, const int64_t *crow,
                         const int64_t *col, int64_t nrows, int64_t r, int64_t c, float *gv, int threads, int64_t l2) {
    const int64_t nnz = crow[nrows];
    int64_t *brow = (int64_t *)malloc((size_t)(nnz + 1) * sizeof(int64_t));
    for (int64_t b = 0; b < nrows; ++b)
        for (int64_t j = crow[b]; j < crow[b + 1]; ++j) brow[j] = b;
    if (c % 32 == 0) grad<8, 2>(g, x, m, nrows * r, kdim, brow, col, nnz, r, c, gv, threads, l2);
    else grad<16, 1>(g, x, m, nrows * r, kdim, brow, col, nnz, r, c, gv, threads, l2);
    free(brow);
}
"""
_SOURCE = "#include <omp.h>\n" + _SOURCE
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_L2 = 384 * 1024  # bytes of x (per macro tile) or of g and x (per token chunk) kept in L2


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = _cbuild.load("block_sparse_linear", _SOURCE, _FLAGS, "the CPU block-sparse linear",
                       "torch's BSR matmul (slower)", language="c++")
    if lib is not None:
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.bsr_forward.restype = lib.bsr_backward_x.restype = lib.bsr_grad.restype = None
        lib.bsr_forward.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i32, i64]
        lib.bsr_backward_x.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ptr, i32, i64]
        lib.bsr_grad.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i32, i64]
    return lib


def available() -> bool:
    """Whether the compiled kernel can run here (building it on first use)."""
    return _library() is not None


def _check(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        assert t is None or (t.device.type == "cpu" and t.is_contiguous() and t.dtype in (torch.float32, torch.int64))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, bias: torch.Tensor | None,
            out_features: int) -> torch.Tensor:
    """x (m, in) times the BSR weight (``values`` (nnz, R, C), ``crow``, ``col``) transposed, + ``bias``: (m, out)."""
    _check(x, values, crow, col, bias)
    (m, kdim), (r, c) = x.shape, values.shape[1:]
    y = torch.empty(m, out_features, dtype=torch.float32)
    _library().bsr_forward(x.data_ptr(), m, kdim, values.data_ptr(), crow.data_ptr(), col.data_ptr(),
                           crow.numel() - 1, r, c, _ptr(bias), y.data_ptr(), torch.get_num_threads(), _L2)
    return y


def backward_x(g: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
               in_features: int) -> torch.Tensor:
    """g (m, out) times the BSR weight: (m, in)."""
    _check(g, values, crow, col)
    r, c = values.shape[1:]
    gx = torch.empty(g.shape[0], in_features, dtype=torch.float32)
    _library().bsr_backward_x(g.data_ptr(), g.shape[0], values.data_ptr(), crow.data_ptr(), col.data_ptr(),
                              crow.numel() - 1, in_features // c, r, c, gx.data_ptr(), torch.get_num_threads(), _L2)
    return gx


def backward_values(g: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                    block: tuple[int, int]) -> torch.Tensor:
    """The stored (nnz, R, C) blocks (``crow``, ``col``) of gᵀ·x."""
    _check(g, x, crow, col)
    gv = torch.empty(col.numel(), *block, dtype=torch.float32)
    _library().bsr_grad(g.data_ptr(), x.data_ptr(), g.shape[0], x.shape[1], crow.data_ptr(), col.data_ptr(),
                        crow.numel() - 1, *block, gv.data_ptr(), torch.get_num_threads(), _L2)
    return gv
