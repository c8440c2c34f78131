"""``lora_linear``: a linear layer plus a (Block-)LoRA update, forward and backward.

    y = x·Wᵀ + b + s·((Σ_j dropout(x)_j)·Aᵀ)·Bᵀ

x (..., in) is cut into ``n_blocks`` contiguous chunks of in/n that are summed (Block-LoRA, Reading
A; ``n_blocks=1`` is plain LoRA); A is (r, in/n), B is (out, r). Dropout acts on the LoRA input only.
No dropout mask is kept between forward and backward: both backends regenerate it from a seed —
the Triton kernels with ``tl.rand``, the reference with a torch generator — and the backward runs on
the backend that ran the forward. One ``torch.library`` op (``blocktrain::lora_linear``) with a fake
and an autograd formula, so ``torch.compile`` sees a single node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blocktrain.kernels import dispatch

__all__ = ["dropout_keep_mask", "lora_linear", "lora_linear_seeded", "lora_linear_unfused"]

_SEED_HIGH = 2**62
_LEVELS = 1 << 16  # the reference draws 16-bit uniforms


def _triton():
    from blocktrain.kernels import _lora_linear_triton

    return _lora_linear_triton


# --------------------------------------------------------------------------------------------
# dropout masks


def _reference_mask(seed: int, rows: int, cols: int, p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Reference dropout mask, 1 = keep and 0 = drop, in ``dtype``, from a generator seeded with ``seed``.

    Each element gets a 16-bit uniform draw w (four per 64-bit generator call, a quarter of the calls
    of ``bernoulli_``, which draws a double per element, serially on non-Intel CPUs) and is kept iff
    w < kept - 2¹⁵, P(keep) = kept / 2¹⁶ with kept = round((1-p)·2¹⁶). For integers that test is
    clamp(kept - 2¹⁵ - w, 0, 1), computed in float: torch's bool-operand kernels are 4x slower here.
    """
    numel = rows * cols
    gen = torch.Generator(device=device).manual_seed(seed)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    kept = min(_LEVELS - 1, max(1, round((1.0 - p) * _LEVELS)))
    draws = words.view(torch.int16)[:numel].view(rows, cols)
    return draws.float().neg_().add_(kept - _LEVELS // 2).clamp_(0, 1).to(dtype)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device: torch.device | str = "cpu",
                      backend: str = "reference") -> Tensor:
    """The bool (rows, cols) keep-mask that ``backend`` draws for ``seed`` over an (rows, cols) input."""
    if backend == "triton":
        return _triton().keep_mask(torch.tensor(seed, dtype=torch.int64, device=device), rows, cols, p).bool()
    if backend != "reference":
        raise ValueError(f"backend must be 'reference' or 'triton', got {backend!r}")
    return _reference_mask(seed, rows, cols, p, torch.float32, torch.device(device)).bool()


# --------------------------------------------------------------------------------------------
# the two backends; x is (M, in) with unit column stride, everything in one dtype


def _xs_is_x(n_blocks: int, seed: Tensor | None) -> bool:
    """Without dropout and blocks the chunk-sum is x itself: it is neither copied nor returned."""
    return n_blocks == 1 and seed is None


def _forward_reference(x2, weight, bias, lora_a, lora_b, scaling, n_blocks, p, seed):
    m, width = x2.shape
    if seed is None:
        xs = x2 if n_blocks == 1 else x2.view(m, n_blocks, -1).sum(1)
    else:
        dropped = _reference_mask(int(seed), m, width, p, x2.dtype, x2.device).mul_(x2)
        xs = dropped if n_blocks == 1 else dropped.view(m, n_blocks, -1).sum(1)
        xs.mul_(1.0 / (1.0 - p))
    u = xs @ lora_a.t()
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(u, lora_b.t(), alpha=scaling)
    return y, xs, u.float()


def _forward_triton(x2, weight, bias, lora_a, lora_b, scaling, n_blocks, p, seed):
    xs, u = _triton().down(x2, lora_a, seed, n_blocks, p, store_xs=not _xs_is_x(n_blocks, seed))
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(u.to(y.dtype), lora_b.t(), alpha=scaling)
    return y, xs, u


def _backward_reference(g2, weight, lora_a, lora_b, xs2, u, scaling, n_blocks, p, seed, need_x):
    # skinny products in the operand layouts that CPU BLAS runs fast (g·B as written is ~10x slower)
    gb = g2 @ lora_b.t().contiguous().t()
    grad_b = (u.t().to(g2.dtype) @ g2).mul_(scaling).t().contiguous()
    grad_a = (gb.t() @ xs2).mul_(scaling)
    if not need_x:
        return None, grad_a, grad_b
    m, k = g2.shape[0], lora_a.shape[1]
    t = (gb @ lora_a).mul_(scaling if seed is None else scaling / (1.0 - p))
    if seed is not None:
        mask = _reference_mask(int(seed), m, n_blocks * k, p, g2.dtype, g2.device).view(m, n_blocks, k)
        lora_part = mask.mul_(t.unsqueeze(1)).view(m, n_blocks * k)
    else:
        lora_part = t if n_blocks == 1 else t.repeat(1, n_blocks)
    return lora_part.addmm_(g2, weight), grad_a, grad_b


def _backward_triton(g2, weight, lora_a, lora_b, xs2, u, scaling, n_blocks, p, seed, need_x):
    tri = _triton()
    gb, gtu = tri.up_grad(g2, lora_b, u)
    grad_b = (gtu * scaling).to(lora_b.dtype)
    grad_a = ((gb.t() @ xs2.float()) * scaling).to(lora_a.dtype)
    if not need_x:
        return None, grad_a, grad_b
    coef = scaling if seed is None else scaling / (1.0 - p)
    lora_part = tri.dx(gb, lora_a, seed, n_blocks, p, coef, g2.dtype)
    return lora_part.addmm_(g2, weight), grad_a, grad_b


_FORWARD = {"reference": _forward_reference, "triton": _forward_triton}
_BACKWARD = {"reference": _backward_reference, "triton": _backward_triton}


def _rows(t: Tensor, width: int) -> Tensor:
    """``t`` as (M, width) with unit column stride."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(1) == 1 or t2.shape[1] == 1 else t2.contiguous()


# --------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("blocktrain::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                    scaling: float, n_blocks: int, dropout_p: float, seed: Tensor | None,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, xs, u): the output, the chunk-sum of dropout(x) (empty when it is x) and xs·Aᵀ (fp32)."""
    lead, width = x.shape[:-1], x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        y, xs, u = _FORWARD[backend](_rows(x, width), weight, bias, lora_a, lora_b, scaling, n_blocks,
                                     dropout_p, seed)
    xs = x.new_empty(0) if _xs_is_x(n_blocks, seed) else xs.view(*lead, xs.shape[1])
    return y.view(*lead, y.shape[1]), xs, u.view(*lead, u.shape[1])


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, n_blocks, dropout_p, seed, backend):
    lead = x.shape[:-1]
    xs = x.new_empty(0) if _xs_is_x(n_blocks, seed) else x.new_empty((*lead, lora_a.shape[1]))
    return (x.new_empty((*lead, weight.shape[0])), xs,
            x.new_empty((*lead, lora_a.shape[0]), dtype=torch.float32))


@torch.library.custom_op("blocktrain::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_y: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xs: Tensor,
                             u: Tensor, seed: Tensor | None, scaling: float, n_blocks: int, dropout_p: float,
                             backend: str, need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_a, grad_b); grad_x is empty unless ``need_x``. ``xs`` is x where it was not kept."""
    lead, out = grad_y.shape[:-1], grad_y.shape[-1]
    with torch.autocast(grad_y.device.type, enabled=False):
        gx, ga, gb = _BACKWARD[backend](_rows(grad_y, out), weight, lora_a, lora_b, _rows(xs, xs.shape[-1]),
                                        _rows(u, u.shape[-1]), scaling, n_blocks, dropout_p, seed, need_x)
    return (grad_y.new_empty(0) if gx is None else gx.view(*lead, gx.shape[1])), ga, gb


@_lora_linear_backward_op.register_fake
def _(grad_y, weight, lora_a, lora_b, xs, u, seed, scaling, n_blocks, dropout_p, backend, need_x):
    gx = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if need_x else grad_y.new_empty(0)
    return gx, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, scaling, n_blocks, dropout_p, seed, backend = inputs
    _, xs, u = output
    ctx.mark_non_differentiable(xs, u)
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, lora_a, lora_b,
                          x if _xs_is_x(n_blocks, seed) else xs, u, seed)
    ctx.args = (scaling, n_blocks, dropout_p, backend)


def _backward(ctx, grad_y, _grad_xs, _grad_u):
    x, weight, lora_a, lora_b, xs, u, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    gx, ga, gb = torch.ops.blocktrain.lora_linear_backward(grad_y, weight, lora_a, lora_b, xs, u, seed,
                                                            *ctx.args, need_x)
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
    gbias = g2.sum(0) if need_bias else None
    return (gx if need_x else None, gw, gbias, ga if need_a else None, gb if need_b else None,
            None, None, None, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public entry points


def _validate(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, n_blocks: int,
              dropout_p: float) -> None:
    width = x.shape[-1]
    if n_blocks < 1:
        raise ValueError(f"lora_linear: n_blocks must be >= 1, got {n_blocks}")
    if width % n_blocks:
        raise ValueError(f"lora_linear: input width {width} is not divisible by n_blocks={n_blocks}")
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"lora_linear: weight must be (out, {width}), got {tuple(weight.shape)}")
    out, k = weight.shape[0], width // n_blocks
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_linear: lora_a must be (r, in/n_blocks) = (r, {k}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out, lora_a.shape[0]):
        raise ValueError(f"lora_linear: lora_b must be (out, r) = ({out}, {lora_a.shape[0]}), "
                         f"got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"lora_linear: bias must be ({out},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


def lora_linear_seeded(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                       scaling: float, n_blocks: int = 1, dropout_p: float = 0.0,
                       seed: Tensor | int | None = None) -> Tensor:
    """:func:`lora_linear` with the dropout mask fixed by ``seed`` (no dropout when ``seed`` is None).

    Deterministic for a given seed and backend; :func:`dropout_keep_mask` returns the mask.
    """
    _validate(x, weight, bias, lora_a, lora_b, n_blocks, dropout_p)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    if weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: x is {x.dtype} but weight is {weight.dtype}")
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    backend = dispatch.select(x.device, x.dtype)
    dispatch.announce("lora_linear", backend)
    if dropout_p == 0.0:
        seed = None
    elif isinstance(seed, int):
        seed = torch.tensor(seed, dtype=torch.int64, device=x.device)
    elif seed is not None and backend == "triton":
        seed = seed.to(x.device)
    y, _, _ = torch.ops.blocktrain.lora_linear(x, weight, bias, lora_a, lora_b, float(scaling), int(n_blocks),
                                               float(dropout_p), seed, backend)
    return y


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float, n_blocks: int = 1, dropout_p: float = 0.0, training: bool = True) -> Tensor:
    """y = x·Wᵀ + b + s·((Σ_j dropout(x)_j)·Aᵀ)·Bᵀ, with x's width cut into ``n_blocks`` chunks.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in/n_blocks); lora_b: (out, r).
    Dropout (``dropout_p`` on the LoRA input) applies when ``training``; its seed comes from torch's
    generator on x's device. Gradients flow to every input that requires them.
    """
    p = float(dropout_p) if training else 0.0
    seed = torch.randint(_SEED_HIGH, (), dtype=torch.int64, device=x.device) if p > 0.0 else None
    return lora_linear_seeded(x, weight, bias, lora_a, lora_b, scaling, n_blocks, p, seed)


def lora_linear_unfused(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                        scaling: float, n_blocks: int = 1, dropout_p: float = 0.0, training: bool = True,
                        mask: Tensor | None = None) -> Tensor:
    """The op as plain autograd-traced torch calls: the parity oracle and the benchmark baseline.

    ``mask`` (bool, x's shape) replaces ``F.dropout``'s own draw when given.
    """
    if mask is not None:
        dropped = x * mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))
    else:
        dropped = F.dropout(x, dropout_p, training)
    xs = dropped.unflatten(-1, (n_blocks, -1)).sum(-2)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(xs, lora_a), lora_b)
