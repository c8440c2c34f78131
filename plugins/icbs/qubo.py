"""The per-block QUBO of iCBS and its pre-processing.

For a block of b weights with originals w0, current weights w (dw = w − w0), gradient g and Hessian H
at the current weights, and x_i = 1 meaning "prune", the new weights are w0⊙(1−x) and the move is
Δ = w0⊙(1−x) − w = −(dw + w0⊙x). The quadratic loss model

    ΔL(x) = γ·gᵀΔ + ½ΔᵀHΔ + ρ‖Δ‖²  =  xᵀQx + const      (x binary, so x_i² = x_i)

gives Q = diag(w0⊙(H dw)) + ½(w0w0ᵀ)⊙H − γ·diag(w0⊙g) + ρ·diag(w0⊙(2dw + w0)) and
const = ½dwᵀH dw − γ·gᵀdw + ρ‖dw‖².
"""
from __future__ import annotations

import torch

__all__ = ["block_qubo", "move_delta", "quadratic_loss_change", "scale_and_cutoff"]


def block_qubo(w0: torch.Tensor, dw: torch.Tensor, g: torch.Tensor, H: torch.Tensor, grad_multiplier: float,
               ridge_multiplier: float = 0.0) -> tuple[torch.Tensor, float]:
    """(Q, const) of the block with 1-D ``w0``, ``dw``, ``g`` and [b, b] ``H``."""
    Hdw = H @ dw
    diag = w0 * Hdw - grad_multiplier * w0 * g + ridge_multiplier * w0 * (2 * dw + w0)
    Q = 0.5 * torch.outer(w0, w0) * H + torch.diag(diag)
    const = 0.5 * dw @ Hdw - grad_multiplier * g @ dw + ridge_multiplier * dw @ dw
    return Q, float(const)


def move_delta(x: torch.Tensor, w0: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """Δ = −(dw + w0⊙x): the change from the current block weights to the ones pruning ``x``."""
    return -(dw + w0 * x.to(w0.dtype))


def quadratic_loss_change(delta: torch.Tensor, g: torch.Tensor, H: torch.Tensor, grad_multiplier: float,
                          ridge_multiplier: float = 0.0) -> float:
    """γ·gᵀΔ + ½ΔᵀHΔ + ρ‖Δ‖²."""
    return float(grad_multiplier * g @ delta + 0.5 * delta @ (H @ delta) + ridge_multiplier * delta @ delta)


def scale_and_cutoff(Q: torch.Tensor, faithful: bool = True,
                     cutoff: float = 1e-12) -> tuple[torch.Tensor, float | None]:
    """Scale Q to mean|Q_nonzero| = 1, then zero the small entries. Returns (Q', scaling) with Q' = scaling·Q
    before the cutoff; scaling is None when Q is all zero.

    ``faithful=True`` reproduces the official ``Q[Q <= cutoff] = 0``, which also zeroes every negative
    entry; ``faithful=False`` zeroes only ``|Q| <= cutoff``.
    """
    Q = Q.float()
    nonzero = Q[Q != 0]
    if nonzero.numel() == 0:
        return Q.clone(), None
    scaling = 1.0 / float(nonzero.abs().mean())
    Q = Q * scaling
    Q[(Q if faithful else Q.abs()) <= cutoff] = 0
    return Q, scaling
