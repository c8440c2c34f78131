"""Unstructured and N:M pruning cores: magnitude, Wanda, SparseGPT, and the mask utilities they share.

``plugin`` binds them to a run (plugins ``magnitude``, ``wanda``, ``sparsegpt``). Names are imported on first
use, so loading a plugin's config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    "calibrate_layers": "calibration", "default_forward": "calibration", "layer_groups": "calibration",
    **{n: "masks" for n in ("apply_masks", "ascending_order", "find_linear_names", "keep_count", "mask_from_scores",
                            "parse_pattern", "row_keep_count", "sparsity_report")},
    **{n: "sparsegpt" for n in ("HessianAccumulator", "cholesky_inverse_upper", "sparsegpt_layer", "sparsegpt_prune")},
    **{n: "wanda" for n in ("InputSquares", "input_square_sums", "magnitude_prune", "magnitude_scores", "wanda_prune",
                            "wanda_scores")},
    **{n: "plugin" for n in ("PruningConfig", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "PruningPlugin",
                             "MagnitudePlugin", "WandaPlugin", "SparseGPTPlugin")},
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
