"""LPViT (Xu et al., ECCV 2024): block-structured, power-aware pruning with equal-slope allocation to a FLOPs budget.

``curves`` holds the per-layer mathematics, ``pruner`` the method on any model (``lpvit_prune``), ``plugin`` binds it
to a run. Names are imported on first use, so loading the config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    **{n: "pruner" for n in ("LPViTSettings", "lpvit_prune", "gradient_statistic", "allocate", "build_costs",
                             "masks_for", "masks_from_gradients", "flops_ratio")},
    **{n: "plugin" for n in ("LPViTConfig", "LPViTPlugin")},
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
