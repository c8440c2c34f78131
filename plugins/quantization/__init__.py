"""Weight quantization baselines: round-to-nearest and GPTQ on the shared grid (``compression.quant``); the
Hessian, block replay and plugin base are the shared ``blocktrain.trainer.compression`` library.

``plugin`` binds them to a run (plugins ``rtn``, ``gptq``). Names are imported on first use, so loading a
plugin's config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    **{n: "rtn" for n in ("search_clip", "rtn_layer", "rtn_quantize")},
    **{n: "gptq" for n in ("gptq_layer", "gptq_quantize")},
    **{n: "plugin" for n in ("RTNConfig", "GPTQConfig", "RTNPlugin", "GPTQPlugin")},
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
