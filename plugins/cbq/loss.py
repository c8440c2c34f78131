"""CBQ's homologous reconstruction loss (§3): E(h1, h2) = ‖h1 − h2‖²₂ + KL(softmax(h1) ‖ softmax(h2)), the
softmax over the hidden dimension, summed over hidden and averaged over tokens (BRECQ's ``lp_loss``
convention, so the rounding regulariser's weight 0.01 keeps its meaning); two branches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distance", "homologous_loss"]


def distance(target: torch.Tensor, out: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """E(target, out) per token, averaged over tokens: squared L2 + ``kl_weight`` · KL(σ(target) ‖ σ(out))."""
    target, out = target.float(), out.float()
    sq = (target - out).pow(2).sum(-1).mean()
    if not kl_weight:
        return sq
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(target, -1), reduction="none", log_target=True).sum(-1).mean()
    return sq + kl_weight * kl


def homologous_loss(out_q: torch.Tensor, fp_of_fp: torch.Tensor, fp_of_q: torch.Tensor | None,
                    kl_weight: float = 1.0) -> torch.Tensor:
    """E(T_fp(X_fp), T_q(X_q)) + E(T_fp(X_q), T_q(X_q)); the second branch is left out when ``fp_of_q`` is None."""
    loss = distance(fp_of_fp, out_q, kl_weight)
    return loss if fp_of_q is None else loss + distance(fp_of_q, out_q, kl_weight)
