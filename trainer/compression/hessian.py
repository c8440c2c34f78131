"""The layer-input Hessian of OBS-style methods (SparseGPT, GPTQ, ...) and its damped inverse.

H = 2XXᵀ/N over the N input rows (tokens) seen, damped by ``damp``·mean(diag H) before inversion.
"""
from __future__ import annotations

import torch

__all__ = ["HessianAccumulator", "cholesky_inverse_upper"]


class HessianAccumulator:
    """Running H = 2XXᵀ/N of a layer's inputs, updated batch by batch (``add``); N counts input rows."""

    def __init__(self, n_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(n_features, n_features, device=device, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.H.shape[0]).to(self.H)
        rows = x.shape[0]
        if rows == 0:
            return
        self.H.mul_(self.n / (self.n + rows))
        self.n += rows
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)

    def state_dict(self) -> dict:
        return {"H": self.H, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.H = state["H"].to(self.H)
        self.n = int(state["n"])


def cholesky_inverse_upper(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹ = UᵀU, in fp32.

    Dead inputs (diag H = 0) get a unit diagonal first; callers zero the matching weight columns.
    """
    H = H.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        raise ValueError(f"Hessian is not positive definite after damping {damp}; increase damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
