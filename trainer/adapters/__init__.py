"""The adapter library the adapter plugins call (core: no Lightning, no Hydra), one place each:

- ``checks``: hyper-parameter and setting checks (no torch);
- ``targeting``: which Linear layers (names or a regex, CLIP towers, encoder-layer ranges);
- ``layer``: ``LoraLinear`` and its variants' protocol ``LoraVariant`` (plain LoRA), as PEFT's
  ``tuners/lora/variants.py``: a variant supplies its parameters' init, forward and merge;
- ``quantized``: LoRA over a quantized base (bitsandbytes 4/8-bit, ``QuantLinear``) and ``LAYERS``, the one
  table that picks the LoRA layer for a base layer's type (as PEFT's ``bnb.py``/``gptq.py`` dispatchers);
- ``surgery``: ``apply_lora`` (wrapping the Linears), merge/unmerge, the adapter's state dict;
- ``attention``: ``nn.MultiheadAttention`` split into q/k/v Linears (open_clip) and fused back;
- ``trainable``: ``modules_to_save``, the new-weights check, parameter counts;
- ``export``: our adapter format, PEFT's, the merged model, and their loading;
- ``plugin``: ``AdapterPlugin``, the base of the adapter plugins.

Names are imported on first use, so the config checks and ``AdapterPlugin`` do not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    "SCALINGS": "checks", "ENCODERS": "checks", "lora_scaling": "checks", "check_lora_args": "checks",
    "check_encoder": "checks", "check_layers": "checks", "check_targets": "checks", "check_export": "checks",
    "Targets": "targeting", "name_matches": "targeting", "select_linears": "targeting",
    "select_targets": "targeting", "clip_towers": "targeting", "layer_index": "targeting",
    "is_open_clip": "targeting",
    "LoraLinear": "layer", "LoraVariant": "layer",
    "QuantizedLoraLinear": "quantized", "LAYERS": "quantized", "lora_class": "quantized", "lora_layer": "quantized",
    "apply_lora": "surgery", "wrap_linears": "surgery", "lora_layers": "surgery", "merge_lora": "surgery",
    "unmerge_lora": "surgery", "lora_state_dict": "surgery",
    "SplitMultiheadAttention": "attention", "split_multihead_attention": "attention",
    "split_attention_modules": "attention", "fused_state_dict": "attention",
    "select_modules_to_save": "trainable", "keep_trainable": "trainable", "modules_to_save": "trainable",
    "frozen_new_weights": "trainable", "check_new_weights_trained": "trainable", "count_parameters": "trainable",
    "save_adapter": "export", "load_adapter": "export", "is_adapter_dir": "export", "save_peft_adapter": "export",
    "save_merged": "export", "merged_state_dict": "export", "peft_task_type": "export",
    "AdapterPlugin": "plugin",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
