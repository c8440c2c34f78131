"""Poincaré-ball ops on B_c^d = {x : c‖x‖² < 1}, c > 0 (geoopt's ``PoincareBall(c)``, curvature −c).

    expmap0(u)  = tanh(√c‖u‖) · u / (√c‖u‖)
    logmap0(x)  = artanh(√c‖x‖) · x / (√c‖x‖)
    dist(x, y)  = (2/√c) · artanh(√c‖(−x) ⊕_c y‖)         (the distance itself, not its square)
    √c‖(−x) ⊕_c y‖ = √c‖x − y‖ / √(c‖x − y‖² + (1 − c‖x‖²)(1 − c‖y‖²)), so
    dist(x, y)  = (2/√c) · asinh(√c‖x − y‖ / √((1 − c‖x‖²)(1 − c‖y‖²)))   (``pairwise_dist``: all pairs)
    radius(x)   = dist(0, x) = (2/√c) · artanh(√c‖x‖)
    M ⊗_c x     = (1/√c) · tanh((‖Mx‖/‖x‖) · artanh(√c‖x‖)) · Mx/‖Mx‖,  0 where Mx = 0

``mobius_matvec`` takes a dense M (out, in); ``block_mobius_matvec`` takes M = diag(M_1 … M_G) as its
blocks (G, k, k) acting on x (..., G·k) viewed as (..., G, k). Every output is projected to
‖x‖ ≤ (1 − eps)/√c (eps = 1e-3, as hgcn). Norms are taken on x / max|x|, so huge inputs do not overflow,
and √c‖x‖ is clamped below 1 before artanh, so points on or outside the boundary stay finite.

The reference computes in float32 or wider (float64 stays float64). ``block_mobius_matvec`` is one
``torch.library`` op (``blocktrain::block_mobius_matvec``): the Triton kernel fuses the block matvec, both
norms, tanh/artanh and the projection, one program per row; its backward kernel recomputes the row and gives
the gradients with respect to Mx and through ‖x‖ (the two block products after it are batched matmuls). The
reference backend's backward is the reference's autograd (recomputed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from blocktrain.kernels import dispatch

__all__ = ["BALL_EPS", "FP32_SAFE_NORM", "block_diag_dense", "block_mobius_matvec", "dist", "expmap0", "logmap0", "mobius_add",
           "mobius_matvec", "pairwise_dist", "project", "radius"]

BALL_EPS = 1e-3  # outputs keep ‖x‖ <= (1 - BALL_EPS)/√c


def _triton():
    from blocktrain.kernels import _poincare_triton

    return _poincare_triton


def _check_c(c: float) -> float:
    c = float(c)
    if not c > 0:
        raise ValueError(f"poincare: the curvature c must be > 0, got {c}")
    return c


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _atanh_limit(dtype: torch.dtype) -> float:
    """The largest √c‖x‖ fed to artanh: below 1 by a margin the dtype resolves."""
    return 1 - 1e-12 if dtype == torch.float64 else 1 - 1e-6


def _norm(x: Tensor) -> Tensor:
    """‖x‖ over the last dim (keepdim), overflow-safe: computed on x / max|x|."""
    scale = x.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return (x / scale).norm(dim=-1, keepdim=True) * scale


def project(x: Tensor, c: float = 1.0, eps: float = BALL_EPS) -> Tensor:
    """x rescaled onto ‖x‖ <= (1 − eps)/√c where it lies beyond (the ball's safe interior)."""
    c = _check_c(c)
    x = _wide(x)
    norm = _norm(x)
    max_norm = (1 - eps) / c ** 0.5
    return torch.where(norm > max_norm, x / norm.clamp_min(torch.finfo(x.dtype).tiny) * max_norm, x)


def expmap0(u: Tensor, c: float = 1.0, eps: float = BALL_EPS) -> Tensor:
    """The exponential map at the origin: tangent vector u -> point of the ball."""
    c = _check_c(c)
    u = _wide(u)
    sc_norm = _norm(u).clamp_min(torch.finfo(u.dtype).tiny) * c ** 0.5
    return project(torch.tanh(sc_norm) * u / sc_norm, c, eps)


def _artanh_norm(x: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """(‖x‖ clamped away from 0, artanh(√c‖x‖) with √c‖x‖ clamped below 1)."""
    norm = _norm(x).clamp_min(torch.finfo(x.dtype).tiny)
    return norm, torch.atanh((norm * c ** 0.5).clamp_max(_atanh_limit(x.dtype)))


def logmap0(x: Tensor, c: float = 1.0) -> Tensor:
    """The logarithmic map at the origin: point of the ball -> tangent vector."""
    c = _check_c(c)
    x = _wide(x)
    norm, at = _artanh_norm(x, c)
    return at * x / (norm * c ** 0.5)


def radius(x: Tensor, c: float = 1.0) -> Tensor:
    """The hyperbolic radius r(x) = d_c(0, x) = (2/√c)·artanh(√c‖x‖), shape x.shape[:-1]."""
    c = _check_c(c)
    _, at = _artanh_norm(_wide(x), c)
    return (2 / c ** 0.5) * at.squeeze(-1)


def mobius_add(x: Tensor, y: Tensor, c: float = 1.0) -> Tensor:
    """x ⊕_c y = ((1 + 2c⟨x,y⟩ + c‖y‖²)x + (1 − c‖x‖²)y) / (1 + 2c⟨x,y⟩ + c²‖x‖²‖y‖²)."""
    c = _check_c(c)
    x, y = _wide(x), _wide(y)
    xy = (x * y).sum(-1, keepdim=True)
    x2, y2 = x.pow(2).sum(-1, keepdim=True), y.pow(2).sum(-1, keepdim=True)
    num = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    return num / (1 + 2 * c * xy + c ** 2 * x2 * y2).clamp_min(torch.finfo(x.dtype).tiny)


def dist(x: Tensor, y: Tensor, c: float = 1.0) -> Tensor:
    """The geodesic distance d_c(x, y) (not squared), shape of the broadcast leading dims."""
    return radius(mobius_add(-_wide(x), y, c), c)


FP32_SAFE_NORM = 0.95  # √c‖·‖ up to which pairwise_dist's float32 path is within 2e-5 of float64 (tests)


def pairwise_dist(x: Tensor, y: Tensor, c: float = 1.0, precision: str = "auto") -> Tensor:
    """d_c(x_i, y_j) for all pairs: x (..., N, D), y (..., M, D) -> (..., N, M), not squared.

    Equals ``dist(x.unsqueeze(-2), y.unsqueeze(-3), c)`` without its (N, M, D) intermediate, in the form
    d = (2/√c)·asinh(√c‖x − y‖ / √((1 − c‖x‖²)(1 − c‖y‖²))) (the module docstring's artanh form rewritten:
    artanh(a/√(a² + b²)) = asinh(a/b), which needs no 1 − s near s → 1). ‖x − y‖ comes from ``torch.cdist``
    computing differences directly, not from ‖x‖² + ‖y‖² − 2⟨x, y⟩: that form cancels for near pairs, and
    1/(1 − c‖x‖²) amplifies the error near the boundary (1.5e-5 in d at coincident points with
    ‖x‖ = 0.999/√c, in float64). The factors 1 − c‖·‖² are clamped at 0 and the asinh argument at the value
    float64 artanh's clamp gives (points on or beyond the boundary stay finite). Returned in x's (≥ fp32) dtype.

    ``precision``: ``auto`` computes in float32 when both inputs are float32 or narrower and every point has
    √c‖·‖ <= ``FP32_SAFE_NORM`` (one host sync for that check), else in float64 — the error of the float32
    path grows as 1/(1 − c‖x‖²): ~1e-5 at √c‖x‖ = 0.99, ~1e-4 at 0.999 (GPUs with slow float64 gain most);
    ``float64`` always float64; ``float32`` always float32, unchecked (for code that cannot sync).
    """
    c = _check_c(c)
    out = torch.promote_types(_wide(x).dtype, y.dtype)
    if precision not in ("auto", "float32", "float64"):
        raise ValueError(f"pairwise_dist: precision must be auto, float32 or float64, got {precision!r}")
    if precision == "auto":
        safe = out == torch.float32 and bool(
            max(x.detach().pow(2).sum(-1).amax(), y.detach().pow(2).sum(-1).amax()) * c <= FP32_SAFE_NORM ** 2)
        precision = "float32" if safe else "float64"
    dtype = torch.float32 if precision == "float32" else torch.float64
    x, y = x.to(dtype), y.to(dtype)
    diff = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")  # ‖x_i − y_j‖
    inner = (1 - c * x.pow(2).sum(-1)).clamp_min(0).unsqueeze(-1) * (1 - c * y.pow(2).sum(-1)).clamp_min(0).unsqueeze(-2)
    limit = _atanh_limit(torch.float64)  # both paths clip d at the same value (≈ 28.3/√c)
    z = c ** 0.5 * diff / inner.clamp_min(torch.finfo(dtype).tiny).sqrt()
    return ((2 / c ** 0.5) * torch.asinh(z.clamp_max(limit / (1 - limit ** 2) ** 0.5))).to(out)


def _scale_direction(mx: Tensor, x: Tensor, c: float, eps: float) -> Tensor:
    """The Möbius matvec from Mx and x: tanh((‖Mx‖/‖x‖)·artanh(√c‖x‖)) · Mx/(‖Mx‖√c), projected."""
    xn, at = _artanh_norm(x, c)
    mxn = _norm(mx)
    safe = mxn.clamp_min(torch.finfo(mx.dtype).tiny)
    t = torch.tanh(mxn / xn * at).clamp_max(1 - eps)
    return torch.where(mxn > 0, t * mx / (safe * c ** 0.5), torch.zeros_like(mx))


def mobius_matvec(m: Tensor, x: Tensor, c: float = 1.0, eps: float = BALL_EPS) -> Tensor:
    """M ⊗_c x for a dense M (out, in) and points x (..., in) -> (..., out) (geoopt's convention: x·Mᵀ)."""
    c = _check_c(c)
    x, m = _wide(x), _wide(m).to(_wide(x).dtype)
    return _scale_direction(x @ m.transpose(-1, -2), x, c, eps)


def block_diag_dense(blocks: Tensor) -> Tensor:
    """The dense (G·k, G·k) matrix diag(M_1 … M_G) of blocks (G, k, k)."""
    return torch.block_diag(*blocks.unbind(0))


def _block_reference(blocks: Tensor, x: Tensor, c: float, eps: float) -> Tensor:
    g, k, _ = blocks.shape
    x = _wide(x)
    mx = torch.einsum("...gj,gij->...gi", x.unflatten(-1, (g, k)), blocks.to(x.dtype)).flatten(-2)
    return _scale_direction(mx, x, c, eps)


# --------------------------------------------------------------------------------------------
# torch.library registration of the block-diagonal op


@torch.library.custom_op("blocktrain::block_mobius_matvec", mutates_args=())
def _block_op(blocks: Tensor, x: Tensor, c: float, eps: float, backend: str) -> Tensor:
    """x (R, G·k) and blocks (G, k, k) of one dtype -> (R, G·k) in that dtype."""
    with torch.autocast(x.device.type, enabled=False):
        if backend == "triton":
            return _triton().block_mobius_matvec(blocks, x, c, eps)
        return _block_reference(blocks, x, c, eps).to(x.dtype)


@_block_op.register_fake
def _(blocks, x, c, eps, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    blocks, x, c, eps, backend = inputs
    ctx.save_for_backward(blocks, x)
    ctx.args, ctx.backend = (c, eps), backend


def _backward(ctx, grad):
    blocks, x = ctx.saved_tensors
    if ctx.backend == "triton":
        gb, gx = _triton().block_mobius_matvec_backward(blocks, x, grad, *ctx.args)
        return gb, gx, None, None, None
    with torch.enable_grad():
        b, xx = blocks.detach().requires_grad_(), x.detach().requires_grad_()
        y = _block_reference(b, xx, *ctx.args)
        gb, gx = torch.autograd.grad(y, (b, xx), grad.to(y.dtype))
    return gb.to(blocks.dtype), gx.to(x.dtype), None, None, None


_block_op.register_autograd(_backward, setup_context=_setup_context)


def block_mobius_matvec(blocks: Tensor, x: Tensor, c: float = 1.0, eps: float = BALL_EPS) -> Tensor:
    """M ⊗_c x for M = diag(blocks[0] … blocks[G-1]), blocks (G, k, k), x (..., G·k) -> (..., G·k).

    Equals ``mobius_matvec(block_diag_dense(blocks), x, c)``; the result is in x's dtype (computed in fp32
    or wider). Triton on CUDA, the reference elsewhere (``kernels.dispatch``).
    """
    c = _check_c(c)
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"block_mobius_matvec: blocks must be (G, k, k), got {tuple(blocks.shape)}")
    width = blocks.shape[0] * blocks.shape[1]
    if x.shape[-1] != width:
        raise ValueError(f"block_mobius_matvec: x's last dim must be G·k = {width}, got {x.shape[-1]}")
    backend = dispatch.select(x.device, x.dtype)
    dispatch.announce("block_mobius_matvec", backend)
    lead = x.shape[:-1]
    y = torch.ops.blocktrain.block_mobius_matvec(blocks.to(x.dtype).contiguous(), x.reshape(-1, width).contiguous(),
                                                 c, float(eps), backend)
    return y.view(*lead, width)
