"""Unstructured and N:M pruning cores: magnitude, Wanda, SparseGPT, and the mask utilities they share."""
from .calibration import calibrate_layers, default_forward, layer_groups
from .masks import (apply_masks, ascending_order, find_linear_names, keep_count, mask_from_scores, parse_pattern,
                    row_keep_count, sparsity_report)
from .sparsegpt import HessianAccumulator, cholesky_inverse_upper, sparsegpt_layer, sparsegpt_prune
from .wanda import InputSquares, input_square_sums, magnitude_prune, magnitude_scores, wanda_prune, wanda_scores

__all__ = [
    "apply_masks", "ascending_order", "calibrate_layers", "cholesky_inverse_upper", "default_forward",
    "find_linear_names", "HessianAccumulator", "input_square_sums", "InputSquares", "keep_count", "layer_groups",
    "magnitude_prune", "magnitude_scores", "mask_from_scores", "parse_pattern", "row_keep_count", "sparsegpt_layer",
    "sparsegpt_prune", "sparsity_report", "wanda_prune", "wanda_scores",
]
