"""The uniform quantization grid every quantization method shares (RTN, GPTQ, CBQ, packed export).

One convention, used everywhere:

- a weight [out, in] is quantized per output channel (``group_size=None``) or per group of ``group_size``
  consecutive input columns; its ``scale`` and ``zero`` have shape [out, n_groups] (n_groups = 1 or in/g);
- groups: column c belongs to group c // g (g = ``group_size``, or ``in`` per channel), so n_groups = ⌈in/g⌉.
  A width g does not divide is an error unless the spec is ``ragged`` (config ``group_remainder: ragged``): then
  the last group covers the remaining in − (n_groups − 1)·g columns and gets its own scale and zero point from
  their range alone. Since ⌈in/g⌉ does not determine g, the group size travels explicitly to every function that
  maps groups to columns (``group_size=None`` there means in/n_groups, equal groups); ``expand_groups`` (group →
  columns) and ``split_groups`` (columns → groups, the last one zero-padded) are the only places that do it;
- integer codes ``q`` lie on 2^bits consecutive integers: asymmetric ``[0, 2^b − 1]`` with an integer zero
  point, symmetric ``[−2^(b−1), 2^(b−1) − 1]`` with zero point 0;
- ``q = clamp(round(w / s) + z)`` and ``ŵ = s · (q − z)``, so 0 is always exactly representable (min/max
  ranges are widened to contain 0) and a pruned (zero) weight can stay exactly zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["QuantSpec", "ActQuantSpec", "QuantLinear", "qrange", "expand_groups", "group_width", "split_groups",
           "minmax_qparams", "quantize", "dequantize", "fake_quantize", "fake_quantize_tokens"]

SUPPORTED_BITS = tuple(range(2, 9))


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: bits, symmetric or asymmetric, per channel (None) or per group of columns;
    ``ragged``: a width the group size does not divide gets a narrower last group (else it is an error)."""

    bits: int = 4
    symmetric: bool = False
    group_size: Optional[int] = None
    ragged: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None (per channel), got {self.group_size}")

    def n_groups(self, in_features: int) -> int:
        """⌈in/g⌉ (1 per channel); a width g does not divide raises unless ``ragged``."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size and not self.ragged:
            raise ValueError(f"group_size {self.group_size} does not divide the input width {in_features} "
                             "(group_remainder: ragged gives the last group the remaining columns)")
        return -(-in_features // self.group_size)


def qrange(spec: QuantSpec) -> tuple[int, int]:
    """The smallest and largest integer code."""
    if spec.symmetric:
        return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    return 0, 2 ** spec.bits - 1


def group_width(in_features: int, n_groups: int, group_size: int | None = None) -> int:
    """Columns per group (the last one may be narrower): ``group_size``, or in/n_groups when None (equal groups);
    checks that ``n_groups`` = ⌈in/g⌉."""
    g = in_features // n_groups if group_size is None else group_size
    if (group_size is None and in_features % n_groups) or g < 1 or -(-in_features // g) != n_groups:
        raise ValueError(f"{n_groups} groups do not fit {in_features} columns with group size {group_size} "
                         "(without a group size the groups must be equal)")
    return g


def expand_groups(t: torch.Tensor, in_features: int, group_size: int | None = None) -> torch.Tensor:
    """[out, n_groups] → [out, in]: group k's value over columns [k·g, min((k+1)·g, in))."""
    g = group_width(in_features, t.shape[1], group_size)
    e = t.repeat_interleave(g, dim=1)
    return e if e.shape[1] == in_features else e[:, :in_features]


def split_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] → [out, n_groups, g] (``group_size`` None: one group of all columns), a narrower last group
    padded with zeros: neutral for sums and for the 0-containing min/max ranges of ``minmax_qparams``."""
    out, cols = w.shape
    g = cols if group_size is None else group_size
    pad = -cols % g
    return (torch.nn.functional.pad(w, (0, pad)) if pad else w).reshape(out, -1, g)


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    spec.n_groups(w.shape[1])  # a remainder without ``ragged`` raises
    return split_groups(w, spec.group_size)


@torch.no_grad()
def minmax_qparams(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [out, n_groups] from each group's range, shrunk by ``clip`` (1 = the full range)."""
    g = _grouped(w.detach().float(), spec)
    lo, hi = qrange(spec)
    wmin = g.amin(dim=2).clamp(max=0) * clip
    wmax = g.amax(dim=2).clamp(min=0) * clip
    if spec.symmetric:
        scale = torch.maximum(wmax, -wmin) / hi
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    scale = (wmax - wmin) / (hi - lo)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (-wmin / scale).round().clamp(lo, hi)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as int32) of ``w`` on the grid ``scale``/``zero`` [out, n_groups], round to nearest."""
    lo, hi = qrange(spec)
    cols = w.shape[1]
    s, z = expand_groups(scale, cols, spec.group_size), expand_groups(zero, cols, spec.group_size)
    return torch.clamp(torch.round(w.float() / s) + z, lo, hi).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32,
               group_size: int | None = None) -> torch.Tensor:
    """ŵ = s · (q − z), with ``scale``/``zero`` [out, n_groups] expanded over their columns (``expand_groups``)."""
    cols = q.shape[1]
    return (expand_groups(scale.float(), cols, group_size)
            * (q.float() - expand_groups(zero.float(), cols, group_size))).to(dtype)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round to nearest on the grid and back (no gradient): ``dequantize(quantize(w))`` in ``w``'s dtype."""
    return dequantize(quantize(w, scale, zero, spec), scale, zero, w.dtype, spec.group_size)


@dataclass(frozen=True)
class ActQuantSpec:
    """How a linear's input is quantized: per token from its own range (``dynamic``), or one static scale/zero."""

    bits: int = 8
    symmetric: bool = False
    dynamic: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"activation bits must be one of {SUPPORTED_BITS}, got {self.bits}")

    @property
    def grid(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric)


def fake_quantize_tokens(x: torch.Tensor, spec: ActQuantSpec) -> torch.Tensor:
    """Per-token (last dim) round-to-nearest fake quantization of activations from each token's own range; the
    gradient passes straight through (STE), so layers before it still train (e.g. adapters on a quantized base)."""
    flat = x.reshape(-1, x.shape[-1])
    scale, zero = minmax_qparams(flat, spec.grid)
    return x + (fake_quantize(flat.detach(), scale, zero, spec.grid).reshape(x.shape) - x).detach()


class QuantLinear(torch.nn.Module):
    """A Linear whose weight is final integer codes + scale/zero (``ŵ = s·(q − z)``), the result of any
    quantization method; its input is fake-quantized when ``act`` is set. Kept zeros (``mask``) stay zero.

    The dequantized weight is cached on first use; ``codes``, ``scale``, ``zero`` and ``bias`` are what an
    export packs.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                 bias: torch.Tensor | None = None, act: ActQuantSpec | None = None,
                 act_scale: torch.Tensor | None = None, act_zero: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.act = spec, act
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.to(torch.int32))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        if act is not None and not act.dynamic:
            if act_scale is None or act_zero is None:
                raise ValueError("a static activation quantizer needs act_scale and act_zero")
            self.register_buffer("act_scale", act_scale.float().reshape(1, 1))
            self.register_buffer("act_zero", act_zero.float().reshape(1, 1))
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                    bias: torch.Tensor | None = None, **act) -> "QuantLinear":
        """Round ``weight`` to nearest on the given grid (a method that chose its own codes passes them to __init__)."""
        return cls(quantize(weight.detach(), scale, zero, spec), scale, zero, spec, bias, **act)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (what the layer computes with)."""
        if self._weight is None or self._weight.device != self.codes.device:
            self._weight = dequantize(self.codes, self.scale, self.zero, group_size=self.spec.group_size)
        return self._weight

    def _apply(self, fn, recurse=True):
        self._weight = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            if self.act.dynamic:
                x = fake_quantize_tokens(x, self.act)
            else:
                flat = x.detach().reshape(-1, x.shape[-1])
                q = fake_quantize(flat, self.act_scale.expand(flat.shape[0], 1), self.act_zero.expand(flat.shape[0], 1),
                                  self.act.grid)
                x = x + (q.reshape(x.shape) - x).detach()
        w = self.weight
        return torch.nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        act = "" if self.act is None else f", act={self.act}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}{act}"
