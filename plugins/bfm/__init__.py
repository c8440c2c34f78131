"""Blockwise Flow Matching (plugin ``bfm``) and its single-network baseline (plugin ``flow_matching``).

The shared backbone, samplers and Fréchet evaluation are the engine library ``blocktrain.trainer.generative``;
here: the BFM network (``model``), its losses and FRN sampler velocity (``core``), the plugins (``plugin``).
Names are imported on first use, so loading the config classes does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    **{n: "model" for n in ("BFM", "build_bfm", "segment_of")},
    **{n: "core" for n in ("split_sizes", "draw_times", "bfm_loss", "frn_loss", "frn_prediction", "alignment_loss",
                           "BFMVelocity")},
    **{n: "plugin" for n in ("BFMConfig", "BFMModelConfig", "FlowMatchingConfig", "BFMPlugin", "FlowMatchingPlugin")},
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
