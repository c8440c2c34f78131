"""iCBS core: iterative Combinatorial Brain Surgeon pruning by block coordinate descent over QUBOs.

``plugin`` binds it to a run (plugin ``icbs``). Names are imported on first use, so loading the plugin's
config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    **{n: "persample" for n in ("capture_io_grads", "mean_weight_grad", "split_batch", "per_sample_block_grads")},
    "ICBSConfig": "pruner", "ICBSPruner": "pruner", "icbs_prune": "pruner",
    **{n: "qubo" for n in ("block_qubo", "move_delta", "quadratic_loss_change", "scale_and_cutoff")},
    "allocate_steps": "selection", "select_block": "selection",
    "LayerState": "state", "TabuList": "state", "init_layer_state": "state",
    "ICBSPluginConfig": "plugin", "ICBSPlugin": "plugin",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
