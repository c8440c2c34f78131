"""iCBS core: iterative Combinatorial Brain Surgeon pruning by block coordinate descent over QUBOs."""
from .persample import capture_io_grads, causal_lm_sample_losses, mean_weight_grad, per_sample_block_grads
from .pruner import ICBSConfig, ICBSPruner, icbs_prune
from .qubo import block_qubo, move_delta, quadratic_loss_change, scale_and_cutoff
from .selection import allocate_steps, select_block
from .state import LayerState, TabuList, init_layer_state

__all__ = [
    "allocate_steps", "block_qubo", "capture_io_grads", "causal_lm_sample_losses", "icbs_prune", "ICBSConfig",
    "ICBSPruner", "init_layer_state", "LayerState", "mean_weight_grad", "move_delta", "per_sample_block_grads",
    "quadratic_loss_change", "scale_and_cutoff", "select_block", "TabuList",
]
