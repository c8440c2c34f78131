"""Block diffusion LMs (BD3-LM base; SDAR, SDAR-VL and NBDiff as switches) on transformers causal LMs.

Core (plain PyTorch): ``add_mask_token``, ``block_diffusion_loss``, ``nelbo_sums``, ``two_stream_logits``
(``objective``), ``sample_t``/``mask_tokens`` (``noise``), ``sample_blocks`` (``sampler``); the masks and the
attention op live in ``blocktrain.kernels.block_diffusion_attention``. ``plugin`` binds them to a run. Names
are imported on first use, so loading the config class does not import torch.
"""
from __future__ import annotations

from blocktrain.trainer.plugin import lazy_exports

_EXPORTS = {
    "add_mask_token": "objective", "block_diffusion_loss": "objective", "nelbo_sums": "objective",
    "two_stream_logits": "objective", "sample_t": "noise", "mask_tokens": "noise", "pbnc_concentration": "noise",
    "sample_blocks": "sampler", "SampleStats": "sampler", "judge_nll": "sampler",
    "BlockDiffusionConfig": "plugin", "BlockDiffusionPlugin": "plugin",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
