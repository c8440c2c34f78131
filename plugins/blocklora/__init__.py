"""Block-LoRA ("One Head Eight Arms", Zhou et al. 2025): LoRA whose down-projection is shared by n blocks.

Block-LoRA is two variants (``variants``: Reading A ``tile_input``, Reading B ``sum_rank``) of the adapter
library's ``LoraLinear`` (``blocktrain.trainer.adapters``), which also chooses the targets (CLIP towers,
layer ranges), splits ``nn.MultiheadAttention``, merges, counts and saves; its names used here are
re-exported. ``surgery`` and ``export`` add Block-LoRA's own entry point and adapter format; ``plugin`` binds
them to a run. Names are imported on first use, so loading the plugin's config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_LIB = "blocktrain.trainer.adapters"
_EXPORTS = {
    "TileInputVariant": "variants", "SumRankVariant": "variants", "BlockLoraVariant": "variants",
    "block_lora_variant": "variants", "block_lora_layer": "variants",
    "apply_block_lora": "surgery", "block_lora_layers": "surgery",
    "save_block_adapter": "export", "load_block_adapter": "export", "is_block_adapter_dir": "export",
    "MODES": "checks", "DROPOUT_POSITIONS": "checks",
    "BlockLoraConfig": "plugin", "BlockLoraPlugin": "plugin",
    "SplitMultiheadAttention": f"{_LIB}.attention", "fused_state_dict": f"{_LIB}.attention",
    "split_multihead_attention": f"{_LIB}.attention",
    "select_targets": f"{_LIB}.targeting", "clip_towers": f"{_LIB}.targeting", "layer_index": f"{_LIB}.targeting",
    "ENCODERS": f"{_LIB}.checks",
    "merge_lora": f"{_LIB}.surgery", "unmerge_lora": f"{_LIB}.surgery", "lora_state_dict": f"{_LIB}.surgery",
    "count_parameters": f"{_LIB}.trainable", "modules_to_save": f"{_LIB}.trainable",
    "save_merged": f"{_LIB}.export",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
