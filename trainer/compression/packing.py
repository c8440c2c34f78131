"""Exporting a quantized model (one with :class:`~blocktrain.trainer.compression.quant.QuantLinear` layers).

Two formats, both ``save_pretrained`` folders that ``AutoModelForCausalLM.from_pretrained`` loads:

- ``compressed-tensors``: the format llm-compressor writes, through compressed-tensors' own lifecycle (the
  schemes attached to plain Linears, ``ModelCompressor.compress_model``, ``save_pretrained``,
  ``update_config``). Weight-only layers are stored ``pack-quantized`` (codes packed densely into int32
  ``weight_packed``, ``weight_scale`` [out, n_groups], ``weight_zero_point`` packed along the output dim,
  ``weight_shape``); layers that also quantize their input are stored ``int-quantized`` (one int8 code per
  weight), the format compressed-tensors picks for them. Loading needs the ``compressed-tensors`` package.
- ``dequantized``: plain Linears holding ŵ = s·(q − z), loadable without compressed-tensors; activation
  quantization is dropped (a weight-only fake-quant model).
- ``native``: our own ``save_pretrained`` of the model as it is (QuantLinear codes, scales, zeros and activation
  ranges, unpacked); a run reloads it with ``init_from=<folder>/model.safetensors`` (the plugin's ``load_weights``).

Conventions: compressed-tensors keeps integer codes signed, in [−2^(b−1), 2^(b−1) − 1], zero points too; our
asymmetric codes and zero points [0, 2^b − 1] are shifted down by 2^(b−1) (q − z is unchanged), our symmetric
codes already are signed and their zero point 0 is not stored. Scales are written in fp32; compressed-tensors
loads them into the model's dtype. See ``packing.md`` for what a runtime can execute.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from blocktrain.trainer.compression.quant import QuantLinear, QuantSpec, dequantize
from blocktrain.trainer.compression.quantizing import EXPORT_FORMATS as FORMATS

__all__ = ["FORMATS", "PackedLinear", "export_quantized", "pack_model", "pack_quant_linear", "quant_linears",
           "read_compressed", "save_compressed", "save_dequantized", "save_native"]


def quant_linears(model: torch.nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of ``model`` by its qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its first floating parameter."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _check_untied(model: torch.nn.Module, layers: dict[str, QuantLinear]) -> None:
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = [name for name, q in layers.items() if q is output]
    if tied:
        raise ValueError(f"{tied[0]} is quantized but tied to the input embedding (config.tie_word_embeddings): "
                         "a reload would tie it back to the unquantized embedding, and compressed-tensors cannot pack "
                         "a weight the embedding shares; leave it out of the quantization targets or untie it first")


def _dense_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` whose QuantLinears are nn.Linears holding their dequantized weight in ``dtype``."""
    layers = quant_linears(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers: quantize it before exporting a quantized model")
    _check_untied(model, layers)
    # deep-copy without the quantized layers (their codes would be copied only to be dropped)
    memo = {id(m): None for m in layers.values()}
    dense = copy.deepcopy(model, memo)
    for name, q in layers.items():
        linear = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype,
                                 device=q.codes.device)
        with torch.no_grad():
            linear.weight.copy_(dequantize(q.codes, q.scale, q.zero, dtype, q.spec.group_size))
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, linear)
    return dense


def pack_quant_linear(q: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, scale, zero) of ``q`` for :func:`blocktrain.kernels.quant_matmul` (2, 4 or 8 bits): codes made
    unsigned (symmetric ones shifted up by 2^(b−1), their zero point with them), so ŵ = s·(u − z) is unchanged."""
    from blocktrain.kernels.quant_matmul import pack_codes

    offset = 2 ** (q.spec.bits - 1) if q.spec.symmetric else 0
    return pack_codes(q.codes + offset, q.spec.bits), q.scale, q.zero + offset


class PackedLinear(torch.nn.Module):
    """A weight-only QuantLinear kept packed (b/32 of an int32 per weight) and run by the ``quant_matmul`` kernel."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        if q.act is not None:
            raise ValueError(f"PackedLinear runs weight-only layers; this one quantizes its input ({q.act})")
        self.bits, self.in_features, self.out_features = q.spec.bits, q.in_features, q.out_features
        self.group_size = q.spec.group_size
        packed, scale, zero = pack_quant_linear(q)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero", zero)
        self.bias = q.bias
        self._cpu_key, self._cpu_packed = None, None

    def cpu_packed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight in torch's CPU int4 layout (``pack_for_cpu``), converted on first use and again whenever the
        buffers change (not saved: the state dict keeps one layout); None off the CPU or where it does not apply."""
        from blocktrain.kernels.quant_matmul import pack_for_cpu

        buffers = (self.packed, self.scale, self.zero)
        key = tuple((t.device, t.data_ptr(), t._version) for t in buffers)
        if key != self._cpu_key:
            self._cpu_key, self._cpu_packed = key, pack_for_cpu(*buffers, self.bits, self.in_features, self.group_size)
        return self._cpu_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from blocktrain.kernels import quant_matmul

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return quant_matmul(x, self.packed, self.scale, self.zero, self.bits, bias, self.cpu_packed(), self.group_size)


def pack_model(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every QuantLinear of ``model`` by its :class:`PackedLinear`, in place; returns ``model``."""
    for name, q in quant_linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PackedLinear(q))
    return model


def _save(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def save_dequantized(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """``save_pretrained`` the fake-quant model as plain Linears (weights ŵ in the model's dtype); activation
    quantization, if any, is not part of this format."""
    return _save(_dense_copy(model, _model_dtype(model)), out_dir, tokenizer)


def save_native(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """``save_pretrained`` the model with its QuantLinears as they are (see the module docstring)."""
    return _save(model, out_dir, tokenizer)


def _ct_args(bits: int, symmetric: bool, strategy: str, **kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, **kw)


def _ct_scheme(q: QuantLinear, targets: list[str]):
    """The compressed-tensors scheme that reproduces ``q``: weight grid and, when set, its input quantizer."""
    from compressed_tensors.quantization import QuantizationScheme

    spec, act = q.spec, q.act
    if spec.group_size is None:
        weights = _ct_args(spec.bits, spec.symmetric, "channel")
    else:
        weights = _ct_args(spec.bits, spec.symmetric, "group", group_size=spec.group_size)
    inputs = None
    if act is not None:
        inputs = _ct_args(act.bits, act.symmetric, "token" if act.dynamic else "tensor", dynamic=act.dynamic)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)


def _signed(zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Our zero point in compressed-tensors' signed code range."""
    return (zero if symmetric else zero - 2 ** (bits - 1)).round().to(torch.int8)


def save_compressed(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` in the compressed-tensors format (see the module docstring); returns the folder.

    The integer codes compressed-tensors derives from the dequantized weights are checked against the
    QuantLinears' own codes, so the file holds exactly our grid."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
    except ImportError as exc:
        raise ImportError("the compressed-tensors export needs the 'compressed-tensors' package "
                          "(pip install compressed-tensors); the 'dequantized' format does not") from exc
    layers = quant_linears(model)
    _check_equal_groups(layers)
    groups: dict[str, list[str]] = {}
    for name, q in layers.items():
        groups.setdefault(repr((q.spec, q.act)), []).append(name)
    asymmetric = any(not q.spec.symmetric and q.act is None for q in layers.values())
    if asymmetric and len(groups) > 1:
        raise ValueError("asymmetric weight-only layers mixed with other settings: transformers (5.24) can load such "
                         "a compressed-tensors checkpoint only by dequantizing it, and that path applies the first "
                         "config group's scheme to every layer; use one setting for all layers or symmetric weights "
                         "(the 'dequantized' format has no such limit)")
    dense = _dense_copy(model, torch.float32)  # codes are re-derived exactly from fp32 ŵ and fp32 scales
    for names in groups.values():
        targets = ["Linear"] if len(groups) == 1 else names
        for name in names:
            q, linear = layers[name], dense.get_submodule(name)
            linear.quantization_scheme = _ct_scheme(q, targets)
            initialize_module_for_quantization(linear)
            with torch.no_grad():
                linear.weight_scale.copy_(q.scale)
                linear.weight_zero_point.copy_(_signed(q.zero, q.spec.bits, q.spec.symmetric))
                if q.act is not None and not q.act.dynamic:
                    linear.input_scale.copy_(q.act_scale.reshape(1))
                    linear.input_zero_point.copy_(_signed(q.act_zero, q.act.bits, q.act.symmetric).reshape(1))
            linear.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(dense)
    compressor.compress_model(dense)
    for name, q in layers.items():
        _check_codes(name, dense.get_submodule(name), q)
    out = _save(dense, out_dir, tokenizer)
    compressor.update_config(str(out))
    if asymmetric:
        _dequantize_on_load(out / "config.json")
    return out


def _check_equal_groups(layers: dict[str, QuantLinear]) -> None:
    """compressed-tensors needs the group size to divide every width: a ragged last group (``group_remainder:
    ragged``) is refused when writing, and a checkpoint holding one fails at transformers' first forward."""
    ragged = [name for name, q in layers.items() if q.spec.group_size and q.in_features % q.spec.group_size]
    if ragged:
        q = layers[ragged[0]]
        raise ValueError(f"{len(ragged)} layer(s) have a narrower last group (e.g. {ragged[0]}: {q.in_features} "
                         f"inputs, groups of {q.spec.group_size}), which the compressed-tensors format cannot hold; "
                         "export 'dequantized' or 'native' instead")


def _dequantize_on_load(config_file: Path) -> None:
    """Mark the checkpoint ``dequantize: true``: transformers then decompresses it while loading. Needed for
    asymmetric pack-quantized layers, whose packed zero points compressed-tensors 0.20.1 cannot place in its
    compressed in-memory layout (it expects them unpacked: a size mismatch at load)."""
    config = json.loads(config_file.read_text())
    config["quantization_config"]["dequantize"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def _check_codes(name: str, linear: torch.nn.Module, q: QuantLinear) -> None:
    """The stored codes must be the QuantLinear's (shifted to the signed range)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = q.spec.bits
    if hasattr(linear, "weight_packed"):
        stored = unpack_from_int32(linear.weight_packed, bits, torch.Size((q.out_features, q.in_features)))
    else:
        stored = linear.weight
    want = q.codes if q.spec.symmetric else q.codes - 2 ** (bits - 1)
    if not torch.equal(stored.to(torch.int32).cpu(), want.cpu()):
        raise RuntimeError(f"{name}: compressed-tensors re-derived codes that differ from the layer's own "
                           f"({int((stored.to(torch.int32).cpu() != want.cpu()).sum())} of {want.numel()})")


def read_compressed(folder: str | os.PathLike) -> tuple[dict[str, dict], QuantSpec]:
    """The weight-only ``pack-quantized`` layers of a compressed-tensors checkpoint (ours or another tool's, e.g.
    llm-compressor's) as ``replace_with_quant_linears`` entries ``{name: {"codes", "scale", "zero"}}`` in our
    convention (unsigned codes and zero points when asymmetric), with their grid. One config group only; a layer
    whose width the group size does not divide (a ragged last group, which compressed-tensors cannot run) or
    whose scales do not match its width and group size is refused."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    groups = list(config.get("config_groups", {}).values())
    if len(groups) != 1 or groups[0].get("format", config.get("format")) != "pack-quantized" \
            or groups[0].get("input_activations"):
        raise ValueError(f"{folder}: expected one weight-only pack-quantized config group, got {groups}")
    w = groups[0]["weights"]
    if w["type"] != "int" or w["strategy"] not in ("channel", "group"):
        raise ValueError(f"{folder}: integer weights per channel or group expected, got {w}")
    spec = QuantSpec(w["num_bits"], w["symmetric"], w["group_size"] if w["strategy"] == "group" else None)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    shift = 0 if spec.symmetric else 2 ** (spec.bits - 1)
    entries = {}
    for key in sorted(k for k in state if k.endswith(".weight_packed")):
        name = key.removesuffix(".weight_packed")
        scale = state[f"{name}.weight_scale"].float()
        shape = torch.Size(state[f"{name}.weight_shape"].tolist())
        if spec.group_size is not None and shape[1] % spec.group_size:
            raise ValueError(f"{folder}: {name} has {shape[1]} inputs, which groups of {spec.group_size} do not "
                             "divide: compressed-tensors cannot hold a ragged last group (transformers refuses to "
                             "run it)")
        if tuple(scale.shape) != (shape[0], spec.n_groups(shape[1])):
            raise ValueError(f"{folder}: {name}: weight_scale {tuple(scale.shape)} does not fit a {tuple(shape)} "
                             f"weight on {spec}")
        codes = unpack_from_int32(state[key], spec.bits, shape)
        zero = (torch.zeros_like(scale) if spec.symmetric else
                unpack_from_int32(state[f"{name}.weight_zero_point"], spec.bits, scale.shape, packed_dim=0).float())
        entries[name] = {"codes": codes.to(torch.int32) + shift, "scale": scale, "zero": zero + shift}
    return entries, spec


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _code_bits(model: torch.nn.Module) -> dict:
    """Bits per quantized weight: the codes alone, and codes plus their scale (fp32) and zero point."""
    layers = quant_linears(model).values()
    n = sum(q.codes.numel() for q in layers)
    codes = sum(q.codes.numel() * q.spec.bits for q in layers)
    params = sum(q.scale.numel() * (32 + (0 if q.spec.symmetric else q.spec.bits)) for q in layers)
    return {"quantized_weights": n, "code_bits_per_weight": codes / n, "bits_per_weight": (codes + params) / n}


def export_quantized(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                     formats: tuple[str, ...] | list[str] = FORMATS) -> dict[str, Path]:
    """Write each of ``formats`` (``compressed-tensors``, ``dequantized``) under ``out_dir/<format>`` and a
    ``quantization.json`` (settings, bits per weight, size on disk per format); returns {format: folder} plus
    ``"report"``: the json file."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; expected some of {list(FORMATS)}")
    out = Path(out_dir)
    writers = {"compressed-tensors": save_compressed, "dequantized": save_dequantized, "native": save_native}
    paths = {fmt: writers[fmt](model, out / fmt, tokenizer) for fmt in formats}
    layers = quant_linears(model)
    report = {
        **_code_bits(model),
        "layers": {name: {"weights": repr(q.spec), "inputs": repr(q.act) if q.act else None}
                   for name, q in layers.items()},
        "formats": {fmt: {"path": str(p), "size_bytes": _size(p)} for fmt, p in paths.items()},
    }
    (out / "quantization.json").write_text(json.dumps(report, indent=2))
    return {**paths, "report": out / "quantization.json"}
