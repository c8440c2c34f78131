"""Round-to-nearest (RTN) weight quantization on the shared grid (``compression.quant``): min–max scale and
zero point per output channel or group, optionally shrunk per group by a clip search that minimises the
squared rounding error of the weights."""
from __future__ import annotations

import torch
from torch import nn

from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import (ActQuantSpec, QuantSpec, fake_quantize, minmax_qparams, quantize,
                                                  split_groups)
from blocktrain.trainer.compression.quantizing import replace_with_quant_linears

__all__ = ["CLIP_CANDIDATES", "search_clip", "rtn_layer", "rtn_quantize"]

CLIP_CANDIDATES = tuple(1.0 - 0.05 * k for k in range(11))  # 1.0, 0.95, ..., 0.5 of each group's min–max range


@torch.no_grad()
def search_clip(weight: torch.Tensor, spec: QuantSpec, candidates=CLIP_CANDIDATES) -> torch.Tensor:
    """Per group [out, n_groups]: the range shrink factor among ``candidates`` with the least Σ (ŵ − w)²."""
    w = weight.detach().float()
    out, cols = w.shape
    best_err = torch.full((out, spec.n_groups(cols)), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    for clip in candidates:
        scale, zero = minmax_qparams(w, spec, clip)
        err = split_groups((fake_quantize(w, scale, zero, spec) - w).pow(2), spec.group_size).sum(2)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, clip, best)
    return best


@torch.no_grad()
def rtn_layer(weight: torch.Tensor, spec: QuantSpec, clip_search: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of one weight [out, in]: each group's (clipped) min–max range, round to nearest."""
    w = weight.detach().float()
    scale, zero = minmax_qparams(w, spec, search_clip(w, spec) if clip_search else 1.0)
    return quantize(w, scale, zero, spec), scale, zero


def rtn_quantize(model: nn.Module, spec: QuantSpec, names: list[str] | None = None, act: ActQuantSpec | None = None,
                 clip_search: bool = False) -> nn.Module:
    """Replace the named Linears (default: all but ``lm_head``) by RTN-quantized ``QuantLinear``s, in place;
    ``act`` adds per-token activation fake-quant (static ranges need calibration: use the ``rtn`` plugin)."""
    if act is not None and not act.dynamic:
        raise ValueError("static activation ranges need calibration data; use a dynamic ActQuantSpec here")
    entries = {}
    for name in find_linear_names(model) if names is None else names:
        codes, scale, zero = rtn_layer(model.get_submodule(name).weight, spec, clip_search)
        entries[name] = {"codes": codes, "scale": scale, "zero": zero}
    replace_with_quant_linears(model, entries, spec, act)
    return model
