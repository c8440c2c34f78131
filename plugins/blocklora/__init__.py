"""Block-LoRA ("One Head Eight Arms", Zhou et al. 2025): LoRA whose down-projection is shared by n blocks.

The core (``layers``, ``attention``, ``surgery``, ``export``) is plain PyTorch; ``plugin`` binds it to a run.
Merging, the adapter's state dict and parameter counts are the ``lora`` plugin's, re-exported here.
Names are imported on first use, so loading the plugin's config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_LORA = "blocktrain.plugins.lora.surgery"
_EXPORTS = {
    "BlockLoraLinear": "layers", "SumRankLoraLinear": "layers", "block_lora_layer": "layers",
    "SplitMultiheadAttention": "attention", "fused_state_dict": "attention",
    "apply_block_lora": "surgery", "select_block_lora_targets": "surgery", "block_lora_layers": "surgery",
    "clip_towers": "surgery", "layer_index": "surgery", "split_multihead_attention": "surgery",
    "merge_lora": _LORA, "unmerge_lora": _LORA, "lora_state_dict": _LORA, "count_parameters": _LORA,
    "modules_to_save": "blocktrain.trainer.adapters",
    "save_block_adapter": "export", "load_block_adapter": "export", "save_block_merged": "export",
    "is_block_adapter_dir": "export",
    "MODES": "checks", "DROPOUT_POSITIONS": "checks", "ENCODERS": "checks",
    "BlockLoraConfig": "plugin", "BlockLoraPlugin": "plugin",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
