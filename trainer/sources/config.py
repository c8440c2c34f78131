"""Structured configs of the built-in model and data sources: one dataclass per ``kind``, registered
like a plugin's own kinds (``register_model_source``, ``register_data_kind``).

``validate_model_config`` / ``validate_data_config`` merge a user's node onto the dataclass its
``kind`` selects and raise ``UserError`` with one clear message for anything wrong. This module
imports no torch, transformers or Lightning, so a config is checked before anything heavy loads.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.registry import DATA_KINDS, MODEL_KINDS, Registry, register_data_kind, register_model_source

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")  # model.quantization (bitsandbytes)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _positive(v):
    return v is None or v > 0


def _fraction(v):
    return 0 <= v < 1


def _nonneg(v):
    return v >= 0


def choices(*values):
    return {"choices": values}


PATH = {"path": True}  # a local file or folder (or glob pattern): must exist when a run starts
POSITIVE = {"check": (_positive, "a positive number")}
FRACTION = {"check": (_fraction, "a number in [0, 1)")}
NONNEG = {"check": (_nonneg, "a number >= 0")}


# -- models ------------------------------------------------------------------------------------
@dataclass
class TransformersModelConfig:
    """A transformers model: ``from_pretrained(id)`` through the Auto class named by ``auto_class``."""

    kind: str = "transformers"
    id: str = MISSING  # hub id, local directory, or pkg://python_package[/subdir]
    auto_class: str = "AutoModel"  # any transformers class by name, e.g. AutoModelForCausalLM, CLIPModel
    revision: Optional[str] = None
    dtype: str = field(default="float32", metadata=choices("float32", "bfloat16", "float16", "auto"))
    # bitsandbytes: load the Linear layers (not the output head) as NF4/FP4 4-bit or LLM.int8() weights (QLoRA)
    quantization: str = field(default="none", metadata=choices(*QUANTIZATIONS))
    quant_compute_dtype: Optional[str] = field(default=None, metadata=choices(None, "float32", "bfloat16", "float16"))
    quant_double: bool = False  # nf4/fp4: also quantize the 4-bit blocks' scales (QLoRA's double quantization)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to from_pretrained (e.g. num_labels)
    tokenizer: Optional[str] = None  # where the processor comes from; null = same as id
    processor: str = field(default="tokenizer",
                           metadata=choices("tokenizer", "image_processor", "processor", "none"))
    gguf_file: Optional[str] = None  # a .gguf file name inside id: loaded and dequantized
    unreachable_hint: Optional[str] = None  # added to "cannot find/reach the model" errors (e.g. an offline recipe)


@dataclass
class GGUFModelConfig(TransformersModelConfig):
    """A GGUF file loaded through transformers and dequantized to a plain (saveable) model."""

    kind: str = "gguf"
    auto_class: str = "AutoModelForCausalLM"
    gguf_file: str = MISSING


@dataclass
class TimmModelConfig:
    """A timm model: ``timm.create_model(name)`` with hub weights, a local checkpoint, or none."""

    kind: str = "timm"
    name: str = MISSING
    pretrained: bool = True  # hub weights (ignored when checkpoint is set)
    checkpoint: Optional[str] = field(default=None, metadata=PATH)  # local .safetensors / .pth / .bin weights
    num_classes: Optional[int] = field(default=None, metadata=NONNEG)  # null = the model's default
    # stochastic depth (create_model's drop_path_rate, per block rising linearly to it; DeiT: 0.1); null = default
    drop_path_rate: Optional[float] = field(default=None, metadata=FRACTION)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to create_model (e.g. img_size)


for _kind, _schema, _source in (("transformers", TransformersModelConfig, "models:TRANSFORMERS"),
                                ("gguf", GGUFModelConfig, "models:TRANSFORMERS"), ("timm", TimmModelConfig, "models:TIMM")):
    register_model_source(_kind, _schema, f"blocktrain.trainer.sources.{_source}")


# -- data --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Keys every data source carries; the engine's DataModule reads them."""

    kind: str = MISSING
    batch_size: int = field(default=32, metadata=POSITIVE)
    eval_batch_size: Optional[int] = field(default=None, metadata=POSITIVE)  # null = batch_size
    num_workers: int = field(default=0, metadata=NONNEG)
    # repeated augmentation (DeiT's RASampler: 3): each sampled training item appears this many times in a row in an
    # epoch of the same length, every copy augmented anew; for sources that augment at random (images: data.augment)
    repeats: int = field(default=1, metadata=POSITIVE)


@dataclass
class TextClassificationDataConfig(DataConfig):
    """CSV / TSV / JSONL / JSON records with a text and a label field, tokenised by the model's tokenizer."""

    kind: str = "text_classification"
    train: str = field(default=MISSING, metadata=PATH)
    val: Optional[str] = field(default=None, metadata=PATH)
    val_fraction: float = field(default=0.1, metadata=FRACTION)  # used when val is null
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = field(default=128, metadata=POSITIVE)


@dataclass
class TextCorpusDataConfig(DataConfig):
    """Plain-text files tokenised into fixed-length sequences for language modelling."""

    kind: str = "text_corpus"
    batch_size: int = field(default=8, metadata=POSITIVE)
    files: List[str] = field(default=MISSING, metadata=PATH)  # files, directories (searched with pattern) or globs
    pattern: str = "**/*.txt"
    seq_len: int = field(default=512, metadata=POSITIVE)
    stride: Optional[int] = field(default=None, metadata=POSITIVE)  # null = seq_len (no overlap)
    max_sequences: Optional[int] = field(default=None, metadata=POSITIVE)  # per split, seeded subset
    val_fraction: float = field(default=0.05, metadata=FRACTION)  # tail of the token stream
    add_eos: bool = True  # end every file with the tokenizer's EOS token


@dataclass
class ImageTransformConfig(DataConfig):
    """Image preprocessing shared by the image sources."""

    image_size: Optional[int] = field(default=None, metadata=POSITIVE)  # null = keep native size
    channels: Optional[int] = field(default=None, metadata=choices(None, 1, 3))  # null = native
    mean: List[float] = field(default_factory=lambda: [0.5])  # one value = every channel
    std: List[float] = field(default_factory=lambda: [0.5])
    # training-split augmentation: none, or deit (timm's RandAugment rand-m9-mstd0.5-inc1, random resized crop,
    # flip, random erasing 0.25, bicubic; needs image_size and 3 channels); evaluation splits are never augmented
    augment: str = field(default="none", metadata=choices("none", "deit"))


@dataclass
class TorchvisionDataConfig(ImageTransformConfig):
    """A ``torchvision.datasets`` class by name; split arguments are found by signature."""

    kind: str = "torchvision"
    name: str = MISSING  # e.g. CIFAR10, FashionMNIST, Food101
    root: str = "~/.cache/blocktrain/data"
    download: bool = True
    train_split: str = "train"
    val_split: Optional[str] = "test"  # null = split val_fraction off the train split
    val_fraction: float = field(default=0.1, metadata=FRACTION)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra dataset arguments


@dataclass
class ImageFolderDataConfig(ImageTransformConfig):
    """A ``root/class_name/image`` directory tree."""

    kind: str = "image_folder"
    path: str = field(default=MISSING, metadata=PATH)
    val_path: Optional[str] = field(default=None, metadata=PATH)
    val_fraction: float = field(default=0.1, metadata=FRACTION)  # used when val_path is null
    image_size: Optional[int] = field(default=224, metadata=POSITIVE)
    channels: Optional[int] = field(default=3, metadata=choices(None, 1, 3))
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass
class TensorsDataConfig(DataConfig):
    """Tensors ``x`` and ``y`` from a ``.pt`` or ``.safetensors`` file."""

    kind: str = "tensors"
    path: str = field(default=MISSING, metadata=PATH)
    val_path: Optional[str] = field(default=None, metadata=PATH)
    val_fraction: float = field(default=0.1, metadata=FRACTION)  # used when val_path is null
    x_key: str = "x"
    y_key: str = "y"


for _kind, _schema in (("text_classification", TextClassificationDataConfig), ("text_corpus", TextCorpusDataConfig),
                      ("torchvision", TorchvisionDataConfig), ("image_folder", ImageFolderDataConfig),
                      ("tensors", TensorsDataConfig)):
    register_data_kind(_kind, _schema, f"blocktrain.trainer.sources.data:build_{_kind}")


# -- validation --------------------------------------------------------------------------------
def validate_model_config(cfg: Any, allow_missing: bool = False) -> DictConfig:
    """The model node merged onto its kind's dataclass; ``UserError`` on any mistake."""
    node = _validate(cfg, "model", MODEL_KINDS, allow_missing)
    if "quantization" in node:
        check_quantization(node)
    return node


def check_quantization(node: DictConfig) -> None:
    """``model.quant_compute_dtype``/``quant_double`` apply to 4-bit (nf4/fp4) quantization only."""
    values = {k: None if OmegaConf.is_interpolation(node, k) else node[k]
              for k in ("quantization", "quant_compute_dtype", "quant_double")}
    if values["quantization"] in ("nf4", "fp4", None):
        return
    for key in ("quant_compute_dtype", "quant_double"):
        if values[key]:
            raise UserError(f"model.{key} applies to 4-bit quantization (model.quantization=nf4 or fp4), "
                            f"not to model.quantization={values['quantization']}")


def validate_data_config(cfg: Any, allow_missing: bool = False) -> DictConfig:
    """The data node merged onto its kind's dataclass; ``UserError`` on any mistake."""
    return _validate(cfg, "data", DATA_KINDS, allow_missing)


def check_source_paths(model: Any, data: Any) -> None:
    """Fail fast: the local paths a model and a data config name exist, checked before anything downloads
    or loads. Hub ids and download folders (``root``) are not paths that must exist."""
    if model is not None:
        model = validate_model_config(model)
        _check_paths(model, "model", MODEL_KINDS)
        MODEL_KINDS.load(model.kind).check_paths(model)
    if data is not None:
        _check_paths(validate_data_config(data), "data", DATA_KINDS)


def _check_paths(node: DictConfig, group: str, kinds: Registry) -> None:
    for f in dataclasses.fields(kinds[node.kind]):
        value = node[f.name] if f.metadata.get("path") else None
        for entry in ([] if value is None else value if isinstance(value, ListConfig) else [value]):
            path = os.path.expanduser(str(entry))
            if not (glob.glob(path, recursive=True) if any(c in path for c in "*?[") else os.path.exists(path)):
                raise UserError(f"{group} path not found: {entry} ({group}.{f.name})")


def _validate(cfg: Any, group: str, kinds: Registry, allow_missing: bool) -> DictConfig:

    deferred: set = set()
    if isinstance(cfg, DictConfig):
        cfg, deferred = _resolve(cfg, group)
    if not isinstance(cfg, dict):
        raise UserError(f"{group} must be a mapping with a 'kind' key, got {cfg!r}")
    kind = cfg.get("kind")
    if kind is None:
        raise UserError(f"{group}.kind is not set. Valid kinds: {', '.join(kinds)}")
    schema = kinds.entry(kind).schema
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in cfg.items():
        if key not in fields:
            raise UserError(f"unknown key '{group}.{key}' for {group} kind '{kind}'. "
                            f"Valid keys: {', '.join(fields)}")
        if key not in deferred and value != MISSING and not _type_ok(value, hints[key]):
            raise UserError(f"{group}.{key} must be {_type_name(hints[key])}, got {value!r}")
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    missing = [name for name in fields if OmegaConf.is_missing(merged, name)]
    if missing and not allow_missing:
        raise UserError(f"missing required value {group}.{missing[0]} (set it, e.g. {group}.{missing[0]}=...)")
    for name, f in fields.items():
        if name in deferred or OmegaConf.is_missing(merged, name):
            continue
        value = merged[name]
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            valid = ", ".join("null" if c is None else str(c) for c in f.metadata["choices"])
            raise UserError(f"{group}.{name} must be one of {valid}, got {value!r}")
        if "check" in f.metadata and value is not None:
            check, description = f.metadata["check"]
            if not check(value):
                raise UserError(f"{group}.{name} must be {description}, got {value!r}")
    OmegaConf.set_struct(merged, True)
    return merged


def _resolve(node: DictConfig, group: str) -> tuple[dict, set]:
    """Plain values of ``node`` with interpolations resolved against the whole config. A key whose
    resolver is not ready yet (it raised ``UserError``, e.g. ``${data_info:num_labels}`` before the data
    is loaded) keeps its interpolation and is checked when it resolves."""
    from omegaconf.errors import InterpolationResolutionError

    values, deferred = {}, set()
    for key in node:
        if OmegaConf.is_missing(node, key):
            values[key] = MISSING
            continue
        try:
            value = node[key]
            values[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except InterpolationResolutionError as e:
            if not _raised_by_resolver(e):
                raise UserError(f"cannot resolve {group}.{key}: {str(e).splitlines()[0]}") from e
            values[key] = OmegaConf.to_container(node, resolve=False)[key]
            deferred.add(key)
    return values, deferred


def _raised_by_resolver(e: BaseException) -> bool:
    """Whether a ``UserError`` (a resolver saying it is not ready) is behind ``e``."""
    while e is not None:
        if isinstance(e, UserError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _type_ok(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Union:  # Optional[X]
        return value is None or any(_type_ok(value, a) for a in args if a is not type(None))
    if origin in (list, List):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:  # Hydra parses `model.revision=1234` as an int: accept numbers as text
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, List):
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(args[0], "values")
    if origin in (dict, Dict):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))

from blocktrain.trainer.sources import scratch_config  # noqa: E402,F401  (registers markov, transformers_config)
