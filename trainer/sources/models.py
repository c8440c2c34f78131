"""Model sources: transformers (hub id, local dir, GGUF file) and timm, behind one ``load_model``.

A transformers or GGUF model may be loaded with its Linear layers quantized by bitsandbytes
(``model.quantization``: nf4, fp4, int8), the base QLoRA-style adapters train over; a GGUF file is
dequantized first, then quantized by bitsandbytes.

Every source loads real weights from the hub or from a local path through the same code; a source
that cannot be reached is a ``UserError``, never a silent random initialisation.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.config import validate_model_config

LOCAL_DIR_HINT = "model.id=/path/to/dir (a folder written by save_pretrained: config.json + weights)"


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer (or image processor / processor / None) and provenance."""

    model: Any
    tokenizer: Any
    source: str
    info: dict = field(default_factory=dict)


def load_model(cfg: Any, processor: Any = None) -> LoadedModel:
    """Load the model a ``model`` config node describes (validated here, so a plain dict works).

    ``processor``: one already returned by ``load_processor(cfg)`` (e.g. to tokenise the data before
    the model's config can be completed from it); loaded here when None.
    """
    from blocktrain.trainer.registry import MODEL_KINDS

    cfg = validate_model_config(cfg)
    return MODEL_KINDS.load(cfg.kind).load(cfg, processor)


def load_processor(cfg: Any):
    """The tokenizer / image processor / processor the model node's source provides (None if it has none)."""
    from blocktrain.trainer.registry import MODEL_KINDS

    cfg = validate_model_config(cfg)
    return MODEL_KINDS.load(cfg.kind).load_processor(cfg)


@dataclass(frozen=True)
class ModelSource:
    """What a ``model.kind`` registers: ``load(cfg, processor) -> LoadedModel``, its processor loader, and
    ``check_paths(cfg)``, which raises ``UserError`` for a missing local path before anything loads (fields
    marked as paths in the schema are checked by the engine)."""

    load: Callable[[Any, Any], LoadedModel]
    load_processor: Callable[[Any], Any] = lambda cfg: None
    check_paths: Callable[[Any], None] = lambda cfg: None


def _check_local(cfg) -> None:
    """A local model folder (or pkg://) with its config.json or GGUF file, and a local tokenizer, exist."""
    _locate(cfg)
    if cfg.tokenizer is not None:
        resolve_model_id(cfg.tokenizer)


def _transformers_processor(cfg):
    """A transformers node's tokenizer / image processor / processor (None with ``processor: none``).
    A tokenizer without a pad token gets its EOS token as pad."""
    if cfg.processor == "none":
        return None
    location, _, gguf_file = _locate(cfg)
    return _load_processor(cfg, location, gguf_file)


# -- transformers ------------------------------------------------------------------------------
def resolve_model_id(model_id: str) -> tuple[str, bool]:
    """``(id or absolute path, is_local)``; ``pkg://package[/sub/dir]`` names a folder inside an
    installed Python package (found without importing it)."""
    model_id = str(model_id)
    if model_id.startswith("pkg://"):
        package, _, sub = model_id[len("pkg://"):].partition("/")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"python package '{package}' is not installed (from model.id={model_id})")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
        if not path.exists():
            raise UserError(f"model path not found: {path} (from model.id={model_id})")
        return str(path), True
    path = Path(model_id).expanduser()
    if path.exists():
        return str(path.resolve()), True
    looks_like_path = (model_id.startswith((".", "/", "~")) or "\\" in model_id or model_id.count("/") > 1
                       or path.suffix in (".gguf", ".safetensors", ".bin", ".json"))
    if looks_like_path:
        raise UserError(f"model path not found: {model_id}")
    return model_id, False


def _locate(cfg) -> tuple[str, bool, str | None]:
    """``(location, is_local, gguf_file)`` of a transformers-kind node; a path to a .gguf file as id
    stands for its folder plus ``gguf_file``."""
    try:
        location, local = resolve_model_id(cfg.id)
    except UserError as e:
        raise UserError(_hinted(cfg, str(e))) from None
    gguf_file = cfg.gguf_file
    if local and Path(location).is_file() and location.endswith(".gguf") and gguf_file is None:
        location, gguf_file = str(Path(location).parent), Path(location).name
    if local and gguf_file is not None and not (Path(location) / gguf_file).is_file():
        raise UserError(f"model path not found: {Path(location) / gguf_file} (model.gguf_file)")
    if local and gguf_file is None and not (Path(location) / "config.json").is_file():
        raise UserError(f"{location} is not a transformers model directory: it has no config.json "
                        f"(expected {LOCAL_DIR_HINT.split(' ', 1)[1]})")
    return location, local, gguf_file


def _load_transformers(cfg, processor) -> LoadedModel:
    import torch

    location, local, gguf_file = _locate(cfg)
    model_cls = _transformers_class(cfg.auto_class)
    kwargs = dict(cfg.kwargs)
    if cfg.revision is not None:
        kwargs["revision"] = cfg.revision
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    dtype_key = "dtype" if _transformers_major_minor() >= (4, 56) else "torch_dtype"
    kwargs[dtype_key] = dtype
    quantization = bnb_config(cfg)
    if quantization is not None and gguf_file is None:
        kwargs["quantization_config"] = quantization

    what = f"'{cfg.id}'" + (f" (gguf_file {gguf_file})" if gguf_file else "")
    try:
        model, loading = model_cls.from_pretrained(location, output_loading_info=True, **kwargs)
    except ImportError as e:
        raise UserError(f"cannot load {what}: {_first_line(e)}") from e
    except OSError as e:
        if local:
            raise UserError(f"cannot load model {what} from {location}: {_first_line(e)}") from e
        hint = f"model.id=/path/to/dir (the folder holding {gguf_file})" if gguf_file else LOCAL_DIR_HINT
        raise UserError(_hinted(cfg, f"cannot load model {what} from the Hugging Face hub: {_first_line(e)} "
                                     f"If the model is on disk, pass its directory: {hint}")) from e
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot load model {what} as {cfg.auto_class}: {_first_line(e)}") from e
    if gguf_file is not None:
        model = gguf_to_clean_model(model)
        if quantization is not None:  # transformers loads GGUF or quantizes, not both: quantize the dequantized copy
            model = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict(),
                                                quantization_config=quantization, **{dtype_key: dtype})

    if quantization is not None and quantization.load_in_4bit:
        reload_own_quant_state(model)
        keep_4bit_layout(model)
    if processor is None and cfg.processor != "none":
        processor = _load_processor(cfg, location, gguf_file)
    pad_id = getattr(processor, "pad_token_id", None) if cfg.processor == "tokenizer" else None
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # e.g. *ForSequenceClassification on a causal LM
    info = {
        "kind": cfg.kind,
        "id": str(cfg.id),
        "location": location,
        "local": local,
        "revision": cfg.revision,
        "gguf_file": gguf_file,
        "auto_class": cfg.auto_class,
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "quantization": cfg.quantization,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "processor": type(processor).__name__ if processor is not None else None,
        "new_weights": new_weights(loading),
    }
    if cfg.processor == "tokenizer":
        info["pad_token"] = processor.pad_token
    if gguf_file is not None:
        source = f"gguf:{Path(location) / gguf_file}" if local else f"gguf:{cfg.id}/{gguf_file}"
    else:
        source = f"transformers:{location}" if local else f"hub:{cfg.id}" + (f"@{cfg.revision}" if cfg.revision else "")
    return LoadedModel(model=model, tokenizer=processor, source=source, info=info)


def bnb_config(cfg):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``).

    nf4/fp4: 4-bit weights in blocks of 64 with an absmax each (``quant_double``: those absmaxes quantized
    too), matmuls in ``quant_compute_dtype`` (null: ``model.dtype``, float32 for auto); int8: LLM.int8()
    (per-row int8, outlier columns above 6.0 in 16-bit). The output head stays unquantized, as transformers does.
    """
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install bitsandbytes")
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = cfg.quant_compute_dtype or (cfg.dtype if cfg.dtype != "auto" else "float32")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_compute_dtype=getattr(torch, compute), bnb_4bit_use_double_quant=cfg.quant_double)


def reload_own_quant_state(model) -> None:
    """Let the model's bitsandbytes 4-bit layers load their own full state dict back (resume, ``init_from`` a
    checkpoint): their quantization state (absmax, quant_map, ...) is not a parameter or buffer, so
    ``load_state_dict`` would call it unexpected. Each layer checks the checkpoint's state equals its own (the
    frozen base the source loaded) and takes it; a different one is an error."""
    import bitsandbytes as bnb
    import torch

    def check_own(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        own: dict = {}
        module._save_to_state_dict(own, prefix, keep_vars=False)
        for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
            value = state_dict.pop(key)
            if key not in own or not torch.equal(value.to(own[key].device), own[key]):
                error_msgs.append(f"{key}: the checkpoint's 4-bit quantization state differs from the base the "
                                  "model source loaded (another model or model.quantization setting)")

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.register_load_state_dict_pre_hook(check_own)


def keep_4bit_layout(model) -> None:
    """Keep the 4-bit weights in bitsandbytes' standard layout. On CPUs with AVX512-BF16, bitsandbytes (0.50)
    repacks a layer's codes in place at its first no-grad eval forward, into a layout that changes the weight's
    shape and fails on layers narrower than its 64-wide blocks; the frozen base would then differ by machine
    between training, evaluation, checkpoints and exports. Matmuls take the portable dequantize path instead."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def new_weights(loading: dict) -> list[str]:
    """The weights ``from_pretrained`` initialised itself (``output_loading_info``): missing from the
    checkpoint, or of another shape there (``ignore_mismatched_sizes``), e.g. a new classifier head."""
    mismatched = [k if isinstance(k, str) else k[0] for k in loading.get("mismatched_keys", ())]
    return sorted({*loading.get("missing_keys", ()), *mismatched})


def _transformers_class(name: str):
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None or not (name.startswith("AutoModel") or isinstance(cls, type)
                           and issubclass(cls, transformers.PreTrainedModel)):
        raise UserError(f"model.auto_class '{name}' is not a transformers model class (e.g. AutoModel, "
                        "AutoModelForCausalLM, AutoModelForSequenceClassification, CLIPModel)")
    return cls


def _load_processor(cfg, location: str, gguf_file: str | None):
    import transformers

    cls = {"tokenizer": transformers.AutoTokenizer, "image_processor": transformers.AutoImageProcessor,
           "processor": transformers.AutoProcessor}[cfg.processor]
    kwargs = {}
    if cfg.tokenizer is None:
        source = location
        if cfg.revision is not None:
            kwargs["revision"] = cfg.revision
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
    else:
        source, _ = resolve_model_id(cfg.tokenizer)
    hint = ("Set model.tokenizer=<dir or hub id> to take it from elsewhere, or model.processor=none "
            "for a model without one")
    try:
        processor = cls.from_pretrained(source, **kwargs)
    except OSError as e:
        if not resolve_model_id(source)[1]:
            raise UserError(_hinted(cfg, f"cannot load '{source}' from the Hugging Face hub: {_first_line(e)} If the "
                                         f"model is on disk, pass its directory: {LOCAL_DIR_HINT}")) from e
        raise UserError(f"cannot load the {cfg.processor} from {source}: {_first_line(e)} {hint}") from e
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot load the {cfg.processor} from {source}: {_first_line(e)} {hint}") from e
    if cfg.processor == "tokenizer":
        # transformers 5 builds a tokenizer of special tokens only when it finds no vocabulary files
        if len(processor) <= len(set(processor.all_special_ids)):
            raise UserError(f"cannot load the tokenizer from {source}: it has no vocabulary (no tokenizer files). "
                            f"{hint}")
        if processor.pad_token is None and processor.eos_token is not None:
            processor.pad_token = processor.eos_token  # causal LMs batch with EOS as pad
    return processor


def gguf_to_clean_model(model):
    """A plain copy of a GGUF-loaded transformers model that ``save_pretrained`` accepts.

    transformers refuses to serialise a model it dequantized from GGUF; this rebuilds the same class
    from the config without its ``quantization_config`` and copies the (dequantized) weights over.
    """
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    dtype = next(model.parameters()).dtype
    clean = type(model)(config).to(dtype)
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.tie_weights()
    clean.eval()
    return clean


def _transformers_major_minor() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# -- timm --------------------------------------------------------------------------------------
def _load_timm(cfg) -> LoadedModel:
    import timm

    kwargs = dict(cfg.kwargs)
    for key in ("num_classes", "drop_path_rate"):
        if cfg[key] is not None:
            if key in kwargs:
                raise UserError(f"model.{key} and model.kwargs.{key} are both set: keep one")
            kwargs[key] = cfg[key]
    if not timm.is_model(cfg.name):
        similar = timm.list_models(f"*{cfg.name}*")[:10]
        hint = f" Similar names: {', '.join(similar)}" if similar else " See timm.list_models()."
        raise UserError(f"unknown timm model '{cfg.name}' (model.name).{hint}")
    pretrained = cfg.pretrained and cfg.checkpoint is None
    try:
        model = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model '{cfg.name}' does not accept these arguments: {_first_line(e)} "
                        "(model.kwargs / model.num_classes)") from e
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise UserError(f"cannot get pretrained weights for timm model '{cfg.name}': {_first_line(e)} "
                        "If the weights are on disk, pass the file: model.checkpoint=/path/to/weights.safetensors "
                        "(or model.pretrained=false for a randomly initialised model)") from e
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    new = []
    if cfg.checkpoint is not None:
        new = _load_timm_checkpoint(model, cfg.name, cfg.checkpoint, cfg.num_classes is not None)
        source = f"timm:{cfg.name} checkpoint {cfg.checkpoint}"
    else:
        source = f"timm:{cfg.name}" + (" (pretrained)" if pretrained else " (random init)")
        if pretrained and cfg.num_classes not in (None, pretrained_cfg.get("num_classes")):
            new = sorted(_head_keys(model) & set(model.state_dict()))  # timm re-initialises a resized head
    info = {
        "kind": "timm",
        "name": cfg.name,
        "pretrained": pretrained,
        "checkpoint": cfg.checkpoint,
        "class": type(model).__name__,
        "num_classes": getattr(model, "num_classes", None),
        "head_reinitialized": bool(new),
        "new_weights": new,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "mean": list(pretrained_cfg.get("mean", ())),
        "std": list(pretrained_cfg.get("std", ())),
    }
    return LoadedModel(model=model, tokenizer=None, source=source, info=info)


def _head_keys(model) -> set[str]:
    """The state-dict keys of a timm model's classifier (``pretrained_cfg["classifier"]``)."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = [classifier] if isinstance(classifier, str) else classifier
    return {f"{c}.{s}" for c in names for s in ("weight", "bias")}


def _load_timm_checkpoint(model, name: str, path: str, num_classes_set: bool) -> list[str]:
    """Load a local weights file into ``model``; drop the classifier only where ``num_classes`` asked for
    a different head. Returns the keys left freshly initialised (the dropped head)."""
    from timm.models import load_state_dict

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model checkpoint not found: {path} (model.checkpoint)")
    try:
        state = load_state_dict(str(file))
    except Exception as e:  # unreadable or foreign file format: the user's file, not our bug
        raise UserError(f"cannot read model checkpoint {path}: {_first_line(e)}") from e
    own = model.state_dict()
    dropped = {k for k in _head_keys(model) if k in state and k in own and state[k].shape != own[k].shape}
    if dropped and not num_classes_set:
        raise UserError(f"checkpoint {path} has a {state[sorted(dropped)[0]].shape[0]}-class head but the model "
                        f"has {own[sorted(dropped)[0]].shape[0]}; set model.num_classes")
    for k in dropped:
        del state[k]
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = sorted(set(own) - set(state) - dropped)
    unexpected = sorted(set(state) - set(own))
    if bad or missing or unexpected:
        detail = "; ".join(f"{label}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else "")
                           for label, keys in (("shape mismatch", bad), ("missing", missing),
                                               ("unexpected", unexpected)) if keys)
        raise UserError(f"checkpoint {path} does not match timm model '{name}' "
                        f"with these settings ({detail})")
    model.load_state_dict(state, strict=not dropped)
    return sorted(dropped)


TRANSFORMERS = ModelSource(_load_transformers, _transformers_processor, _check_local)
TIMM = ModelSource(lambda cfg, processor: _load_timm(cfg))


def _hinted(cfg, message: str) -> str:
    """``message`` plus the recipe's ``model.unreachable_hint`` (e.g. an offline alternative), if any."""
    hint = cfg.get("unreachable_hint")
    return f"{message} {hint}" if hint else message


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0].strip()
    return line if line.endswith((".", "!", "?")) else line + "."
