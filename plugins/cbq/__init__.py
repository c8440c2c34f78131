"""CBQ core: cross-block post-training quantization (sliding windows, homologous loss, LoRA-Rounding, CFP).

``plugin`` binds it to a run (plugin ``cbq``). Names are imported on first use, so loading the plugin's config
class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    "CBQSettings": "cbq", "cbq_quantize": "cbq", "find_blocks": "cbq", "adam_learn": "cbq",
    "CBQLinear": "quantizer",
    **{n: "rounding" for n in ("adaround_v0", "LoraRounding", "rounding_regularizer", "BetaSchedule", "hard_codes")},
    "Window": "windows", "window_schedule": "windows",
    "distance": "loss", "homologous_loss": "loss",
    "CFPSettings": "settings",
    **{n: "cfp" for n in ("outlier_mask", "weight_clip", "clip_lowers_error", "input_mean_squares", "norm_linear_groups", "channel_scales",
                          "fold_scales", "cfp_preprocess")},
    "CBQConfig": "plugin", "CBQPlugin": "plugin",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
