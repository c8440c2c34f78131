"""LoRA (Hu et al. 2021): low-rank adapters on chosen Linear layers of any transformers/timm model.

The core is the adapter library ``blocktrain.trainer.adapters`` (plain LoRA is its default variant); its
public names are re-exported here. ``plugin`` binds it to a run. Names are imported on first use, so
loading the plugin's config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_LIB = "blocktrain.trainer.adapters"
_EXPORTS = {
    "LoraLinear": f"{_LIB}.layer", "LoraVariant": f"{_LIB}.layer",
    "lora_scaling": f"{_LIB}.checks", "SCALINGS": f"{_LIB}.checks",
    "apply_lora": f"{_LIB}.surgery", "select_linears": f"{_LIB}.targeting", "lora_layers": f"{_LIB}.surgery",
    "modules_to_save": f"{_LIB}.trainable", "count_parameters": f"{_LIB}.trainable",
    "merge_lora": f"{_LIB}.surgery", "unmerge_lora": f"{_LIB}.surgery", "lora_state_dict": f"{_LIB}.surgery",
    "save_adapter": f"{_LIB}.export", "load_adapter": f"{_LIB}.export", "save_peft_adapter": f"{_LIB}.export",
    "save_merged": f"{_LIB}.export", "merged_state_dict": f"{_LIB}.export", "peft_task_type": f"{_LIB}.export",
    "LoraConfig": "plugin", "LoraPlugin": "plugin",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
