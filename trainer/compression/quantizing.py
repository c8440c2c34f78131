"""The base of quantization plugins (RTN, GPTQ, CBQ): the config keys they share, the targets, config and
pipeline checks, the layer-by-layer resumable calibrate loop, the final swap of each target ``nn.Linear``
for a ``QuantLinear`` (``compression.quant``), pruned zeros kept exactly zero, and the size report.

Torch-free at import, so the plugins' configs validate before anything loads.

A method subclasses ``QuantizationPlugin`` and implements ``quantize_layer`` (one weight → codes, scale,
zero on the shared grid) and, when it reads calibration data, ``make_stats``. While calibrating, targets stay
``nn.Linear`` holding their dequantized weights (so later layers see the quantized model's inputs); after the
last layer every target becomes a ``QuantLinear``. Activations are not fake-quantized during calibration.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, List, Optional

from blocktrain.trainer.compression.config import CalibrationConfig
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin, PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.compression.quant import ActQuantSpec, QuantSpec
    from blocktrain.trainer.context import RunContext

__all__ = ["QuantConfig", "QuantizationPlugin", "LayerStats", "replace_with_quant_linears", "quantized_size", "NO_ACT_QUANT",
           "SCALE_BITS"]

WEIGHT_BITS = tuple(range(2, 9))
ACT_BITS = tuple(range(4, 9))
NO_ACT_QUANT = 16  # act_bits=16: activations stay in the model's precision (weight-only, WxA16)
SCALE_BITS = 16  # a scale counts as 16 bits (fp16/bf16, as the packed formats store it) in the size report
GROUP_REMAINDERS = ("error", "ragged")  # ``group_remainder``: see ``compression.quant``
EXPORT_FORMATS = ("compressed-tensors", "dequantized", "native")  # the export stage's formats (``compression.packing``)


@dataclass
class QuantConfig(PluginConfig):
    """Keys every quantization plugin has: the weight grid, the activation quantizer, targets, calibration."""

    section: ClassVar[str] = "plugin.quantize"  # where the keys live, for messages; each plugin sets its own

    bits: int = 4  # weight bits, 2..8
    group_size: Optional[int] = None  # null = one scale per output channel; else input columns per group (32, 64, 128)
    group_remainder: str = "error"  # a width group_size does not divide: error, or ragged (a narrower last group)
    symmetric: bool = False  # weights: false = asymmetric min-max with a zero point; true = zero point 0
    act_bits: int = 16  # 16 = activations not quantized (WxA16); 4..8 = fake-quantized linear inputs (asymmetric)
    act_dynamic: bool = True  # true = per-token ranges at run time; false = one static range per layer, calibrated
    exclude: List[str] = field(default_factory=lambda: ["lm_head"])  # Linear names (last part) left unquantized
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    save_every_s: float = 300.0  # resumable state (finished layers) written at most this often
    export_formats: List[str] = field(default_factory=lambda: list(EXPORT_FORMATS[:2]))  # what the export stage writes

    def __post_init__(self):
        where = self.section
        unknown = [f for f in self.export_formats if f not in EXPORT_FORMATS]
        if unknown:
            raise UserError(f"{where}.export_formats: unknown format(s) {unknown}; choose from {list(EXPORT_FORMATS)}")
        if self.bits not in WEIGHT_BITS:
            raise UserError(f"{where}.bits={self.bits} is not supported: weights are quantized to 2..8 bits")
        if self.group_size is not None and self.group_size < 1:
            raise UserError(f"{where}.group_size={self.group_size} is not supported: null (one scale per output "
                            "channel) or a positive number of input columns per group (e.g. 32, 64, 128)")
        if self.group_remainder not in GROUP_REMAINDERS:
            raise UserError(f"{where}.group_remainder={self.group_remainder!r} is not supported: 'error' (a group size "
                            "must divide every target's width) or 'ragged' (the last group of a row covers the rest)")
        if self.act_bits != NO_ACT_QUANT and self.act_bits not in ACT_BITS:
            raise UserError(f"{where}.act_bits={self.act_bits} is not supported: 4..8, or {NO_ACT_QUANT} for "
                            "activations left unquantized")
        self.calibration.check(f"{where}.calibration")


class LayerStats:
    """A layer group's calibration statistics: the method's own (``inner``, e.g. a Hessian) and, for static
    activation quantization, the range of its inputs over every calibration token."""

    def __init__(self, inner: Any = None, track_range: bool = False):
        self.inner, self.track_range = inner, track_range
        self.lo, self.hi = math.inf, -math.inf

    def add(self, x: "torch.Tensor") -> None:
        if self.inner is not None:
            self.inner.add(x)
        if self.track_range:
            self.lo, self.hi = min(self.lo, float(x.amin())), max(self.hi, float(x.amax()))


def _prune_plugins_before(run: "RunContext", name: str) -> list[str]:
    """The ``prune`` plugins listed before ``name`` in the run's plugin list."""
    from blocktrain.trainer.registry import load_plugin_class
    from blocktrain.trainer.validation import PLUGIN_MARKER

    section = run.cfg.get("plugin") or {}
    order = [n for n, node in section.items() if node is not None and node.get(PLUGIN_MARKER) == n]
    before = order[:order.index(name)] if name in order else []
    return [n for n in before if load_plugin_class(n).kind == "prune"]


class QuantizationPlugin(Plugin):
    """Base of the quantization plugins: targets, checks, the resumable layer loop, QuantLinear swap, report."""

    config_class = QuantConfig
    kind = "quantize"
    conflicts = ("quantize",)  # each quantizer starts from full-precision weights; a pruner may come before

    def __init__(self, config):
        cls = self.config_class
        super().__init__(config if isinstance(config, cls) else cls(**dict(config)))
        self.names: list[str] = []
        self.keep_zeros = False  # a prune plugin ran earlier: its zeros stay exactly zero

    # -- what a method provides ----------------------------------------------------------------
    @property
    def needs_data(self) -> bool:
        """Whether calibrate reads calibration batches (always for static activation ranges)."""
        return self.static_activations

    def make_stats(self, module: "torch.nn.Module") -> Any:
        """The method's statistics object filled from a layer group's inputs (``add(x)``), or None."""
        return None

    def quantize_layer(self, weight: "torch.Tensor", stats: Any,
                       keep: "torch.Tensor | None") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """(codes, scale, zero) of one weight [out, in] on ``self.spec``; ``keep`` (True = nonzero) is the mask
        of a pruned weight whose other entries must get code = zero point, or None."""
        raise NotImplementedError

    # -- specs ---------------------------------------------------------------------------------
    @property
    def spec(self) -> "QuantSpec":
        from blocktrain.trainer.compression.quant import QuantSpec

        c = self.config
        return QuantSpec(c.bits, c.symmetric, c.group_size, c.group_remainder == "ragged")

    @property
    def act_spec(self) -> "ActQuantSpec | None":
        from blocktrain.trainer.compression.quant import ActQuantSpec

        c = self.config
        return None if c.act_bits == NO_ACT_QUANT else ActQuantSpec(c.act_bits, False, c.act_dynamic)

    @property
    def static_activations(self) -> bool:
        return self.config.act_bits != NO_ACT_QUANT and not self.config.act_dynamic

    # -- hooks ---------------------------------------------------------------------------------
    def apply(self, model: "torch.nn.Module", run: "RunContext") -> "torch.nn.Module":
        """Find the targets and check the group size against their widths (before any calibration)."""
        from blocktrain.trainer.compression.masks import find_linear_names

        c = self.config
        self.names = find_linear_names(model, exclude=tuple(c.exclude))
        if not self.names:
            raise UserError(f"plugin {self.name}: the model has no nn.Linear layers to quantize outside "
                            f"plugin.{self.name}.exclude={list(c.exclude)}")
        ragged = self._ragged_layers(model)
        if ragged and c.group_remainder == "error":
            widths = {name: model.get_submodule(name).in_features for name in self.names}
            common = math.gcd(*widths.values())
            raise UserError(f"plugin.{self.name}.group_size={c.group_size} does not divide the input width of "
                            f"{len(ragged)} target layer(s), e.g. {ragged[0]} ({widths[ragged[0]]} inputs); use a "
                            f"divisor of {common}, the widths' greatest common divisor (e.g. {common & -common}), null "
                            "for one scale per output channel, leave those layers out with "
                            f"plugin.{self.name}.exclude, or set plugin.{self.name}.group_remainder=ragged (the last "
                            "group of each row covers the remaining columns)")
        self.keep_zeros = bool(_prune_plugins_before(run, self.name))
        self._check_export(model, run, ragged)
        return model

    def _ragged_layers(self, model: "torch.nn.Module") -> list[str]:
        """The targets whose input width the group size does not divide."""
        g = self.config.group_size
        return [] if g is None else [n for n in self.names if model.get_submodule(n).in_features % g]

    def _check_export(self, model: "torch.nn.Module", run: "RunContext", ragged: list[str]) -> None:
        """Before any calibration: the export formats this run will write can be written."""
        import importlib.util

        from blocktrain.trainer.stages import parse_stages

        if not any(s.kind == "export" for s in parse_stages(run.cfg.stages)) or not hasattr(model, "save_pretrained"):
            return
        if "compressed-tensors" not in self.config.export_formats:
            return
        if ragged:
            raise UserError(f"plugin.{self.name}.group_remainder=ragged leaves {len(ragged)} target layer(s) with a "
                            f"narrower last group (e.g. {ragged[0]}), which the compressed-tensors format cannot hold "
                            "(it needs every group size to divide the width); set "
                            f"plugin.{self.name}.export_formats=[dequantized] (or [dequantized, native])")
        if importlib.util.find_spec("compressed_tensors") is None:
            raise UserError(f"plugin.{self.name}.export_formats includes compressed-tensors, which needs the "
                            "'compressed-tensors' package (pip install compressed-tensors); install it or set "
                            f"plugin.{self.name}.export_formats=[dequantized]")

    def calibrate(self, model: "torch.nn.Module", run: "RunContext") -> None:
        import torch

        from blocktrain.trainer.callbacks import peak_memory_gb

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self.replace(model, self.quantize_layers(model, run))
        run.log({f"{self.name}/calibrate_time_s": time.perf_counter() - start,
                 f"{self.name}/calibrate_peak_mem_gb": peak_memory_gb()})

    def quantize_layers(self, model: "torch.nn.Module", run: "RunContext") -> dict[str, dict]:
        """Quantize every target, layer group by layer group (``calibrate_layers``, each group from the model
        quantized so far) when the method reads data, else one by one; each finished layer joins the
        resumable state (``resume=auto`` restores it). Returns ``{name: {"codes", "scale", "zero"[, "act_scale",
        "act_zero"]}}`` (on the CPU); the targets hold their dequantized weights."""
        import torch

        from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
        from blocktrain.trainer.compression.quant import dequantize, expand_groups, minmax_qparams
        from blocktrain.trainer.compression.replay import calibrate_layers
        from blocktrain.trainer.compression.state import ResumableState

        c = self.config
        state = ResumableState(run, self.name, dataclasses.asdict(c), c.save_every_s, free=("save_every_s",))
        done: dict[str, dict] = state.load() or {}
        with torch.no_grad():
            for name, entry in done.items():
                weight = model.get_submodule(name).weight
                weight.copy_(dequantize(entry["codes"], entry["scale"], entry["zero"], weight.dtype,
                                        self.spec.group_size).to(weight.device))
        remaining = [n for n in self.names if n not in done]
        if done:
            print(f"{self.name}: resumed with {len(done)} of {len(self.names)} layers quantized", file=sys.stderr)
        if not remaining:
            return done

        @torch.no_grad()
        def quantize_one(name: str, module: "torch.nn.Module", stats: LayerStats | None) -> None:
            weight = module.weight
            keep = weight != 0 if self.keep_zeros else None
            codes, scale, zero = self.quantize_layer(weight, None if stats is None else stats.inner, keep)
            if keep is not None:
                zeros = expand_groups(zero, codes.shape[1], self.spec.group_size)
                codes = torch.where(keep, codes, zeros.to(codes.dtype))
            weight.copy_(dequantize(codes, scale, zero, weight.dtype, self.spec.group_size))
            entry = {"codes": codes.to(torch.int32).cpu(), "scale": scale.float().cpu(), "zero": zero.float().cpu()}
            if self.static_activations:
                act_scale, act_zero = minmax_qparams(torch.tensor([[stats.lo, stats.hi]]), self.act_spec.grid)
                entry.update(act_scale=act_scale, act_zero=act_zero)
            done[name] = entry

        with state.steps(len(remaining), f"{self.name}: quantizing {len(remaining)} layers", lambda: done) as step_done:

            def finish(name, module, stats):
                quantize_one(name, module, stats)
                step_done()

            if self.needs_data:
                cal = c.calibration
                seed = int(run.cfg.seed if cal.seed is None else cal.seed)
                batches = calibration_batches(run.data, cal.samples, cal.batch_size, seed, run.device,
                                              where=f"plugin.{self.name}.calibration")
                calibrate_layers(model, remaining, batches, calibration_forward,
                                 lambda m: LayerStats(self.make_stats(m), self.static_activations), finish)
            else:
                for name in remaining:
                    finish(name, model.get_submodule(name), None)
        state.save(done)
        return done

    def replace(self, model: "torch.nn.Module", entries: dict[str, dict]) -> None:
        """Swap each named ``nn.Linear`` for a ``QuantLinear`` holding its entry's codes and scales."""
        replace_with_quant_linears(model, entries, self.spec, self.act_spec)

    def load_weights(self, model: "torch.nn.Module", path: Path) -> bool:
        """``init_from`` a whole-model safetensors save of a model quantized by this plugin: the targets become
        ``QuantLinear`` shells of the right shapes, which the engine's loader then fills (returns False)."""
        import torch
        from safetensors import safe_open

        path = Path(path)
        if path.suffix != ".safetensors" or not path.is_file() or not self.names:
            return False
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        if not all(f"{name}.codes" in keys for name in self.names):
            return False
        shells = {}
        for name in self.names:
            out, cols = model.get_submodule(name).weight.shape
            groups = self.spec.n_groups(cols)
            shells[name] = {"codes": torch.zeros(out, cols, dtype=torch.int32), "scale": torch.ones(out, groups),
                            "zero": torch.zeros(out, groups)}
            if self.static_activations:
                shells[name].update(act_scale=torch.ones(1, 1), act_zero=torch.zeros(1, 1))
        self.replace(model, shells)
        return False

    def export(self, model: "torch.nn.Module", out_dir: Path, run: "RunContext") -> list[Path]:
        """A transformers model: each of ``export_formats`` as a ``save_pretrained`` folder plus
        ``quantization.json`` (``compression.packing``). Any other model: nothing here, so the engine saves the
        whole model (codes, scales, zeros), which ``init_from`` reloads through ``load_weights``."""
        if not hasattr(model, "save_pretrained"):
            return []
        from blocktrain.trainer.compression.packing import export_quantized

        return list(export_quantized(model, out_dir, run.tokenizer, self.config.export_formats).values())

    def evaluate(self, model: "torch.nn.Module", run: "RunContext") -> dict[str, float]:
        """Bits per weight of the targets (codes + scales/zeros) and the model's size with packed codes."""
        bits, numel, size = quantized_size(model, self.names)
        metrics = {f"{self.name}/bits_per_weight": bits / numel, f"{self.name}/model_size_mb": size / 2**20}
        print(f"{self.name}: {len(self.names)} layers at {bits / numel:.3f} bits/weight; model "
              f"{size / 2**20:.2f} MiB with packed codes", file=sys.stderr)
        return metrics


def replace_with_quant_linears(model: "torch.nn.Module", entries: dict[str, dict], spec: "QuantSpec",
                               act: "ActQuantSpec | None" = None) -> None:
    """Swap each named ``nn.Linear`` of ``model`` for a ``QuantLinear`` from its entry ``{"codes", "scale", "zero"[,
    "act_scale", "act_zero"]}`` (the Linear's bias kept), on the Linear's device."""
    from blocktrain.trainer.compression.quant import QuantLinear

    for name, e in entries.items():
        linear = model.get_submodule(name)
        layer = QuantLinear(e["codes"], e["scale"], e["zero"], spec, linear.bias, act=act,
                            act_scale=e.get("act_scale"), act_zero=e.get("act_zero"))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to(linear.weight.device))


def quantized_size(model: "torch.nn.Module", names: list[str]) -> tuple[int, int, int]:
    """(bits of the named layers' weights, their weight count, bytes of the whole model) with every
    ``QuantLinear`` counted packed: ``bits`` per code, ``SCALE_BITS`` per scale, ``bits`` per zero point when
    asymmetric; other tensors (shared ones once) at their dtype's size."""
    from blocktrain.trainer.compression.quant import QuantLinear

    seen: set[int] = set()
    total_bits = 0
    for module in model.modules():
        quantized = isinstance(module, QuantLinear)
        for tensor_name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if quantized and tensor_name in ("codes", "scale", "zero"):
                total_bits += _packed_bits(module, tensor_name)
            elif not (quantized and tensor_name.startswith("act_")):
                total_bits += t.numel() * t.element_size() * 8
    layer_bits = layer_numel = 0
    for name in names:
        module = model.get_submodule(name)
        layer_numel += module.weight.numel()
        if isinstance(module, QuantLinear):
            layer_bits += sum(_packed_bits(module, t) for t in ("codes", "scale", "zero"))
        else:
            layer_bits += module.weight.numel() * module.weight.element_size() * 8
    return layer_bits, layer_numel, math.ceil(total_bits / 8)


def _packed_bits(module, tensor_name: str) -> int:
    spec, t = module.spec, getattr(module, tensor_name)
    per = {"codes": spec.bits, "scale": SCALE_BITS, "zero": 0 if spec.symmetric else spec.bits}[tensor_name]
    return t.numel() * per
