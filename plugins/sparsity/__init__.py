"""Unstructured and N:M pruning cores: magnitude, Wanda, SparseGPT (masks, scores, block replay and the
Hessian they use are the shared ``blocktrain.trainer.compression`` library).

``plugin`` binds them to a run (plugins ``magnitude``, ``wanda``, ``sparsegpt``). Names are imported on first
use, so loading a plugin's config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    **{n: "sparsegpt" for n in ("sparsegpt_layer", "sparsegpt_prune")},
    **{n: "wanda" for n in ("magnitude_prune", "wanda_prune")},
    **{n: "plugin" for n in ("MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "MagnitudePlugin", "WandaPlugin",
                             "SparseGPTPlugin")},
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
