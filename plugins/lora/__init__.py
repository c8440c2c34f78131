"""LoRA (Hu et al. 2021): low-rank adapters on chosen Linear layers of any transformers/timm model.

The core (``layers``, ``surgery``, ``export``) is plain PyTorch; ``plugin`` binds it to a run. Names are
imported on first use, so loading the plugin's config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    "LoraLinear": "layers", "lora_scaling": "checks", "SCALINGS": "checks",
    "apply_lora": "surgery", "select_linears": "surgery", "lora_layers": "surgery",
    "modules_to_save": "blocktrain.trainer.adapters",
    "merge_lora": "surgery", "unmerge_lora": "surgery", "lora_state_dict": "surgery", "count_parameters": "surgery",
    "save_adapter": "export", "load_adapter": "export", "save_peft_adapter": "export", "save_merged": "export",
    "merged_state_dict": "export", "peft_task_type": "export",
    "LoraConfig": "plugin", "LoraPlugin": "plugin",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
