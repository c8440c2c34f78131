"""Export formats of a LoRA-adapted model, any variant (core: no Lightning, no Hydra).

- ``save_adapter`` / ``load_adapter``: our own adapter (``lora_config.json`` + ``lora_adapter.safetensors``);
  what ``init_from`` loads. A variant's plugin adds its own settings file beside them (``blocklora``).
- ``save_peft_adapter``: ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(base, dir)`` loads (plain LoRA only, ``n_blocks == 1``).
- ``save_merged``: the merged weights without the LoRA wrappers: ``save_pretrained`` for transformers
  models, ``model.safetensors`` + timm's ``config.json`` for timm models, ``model.safetensors`` otherwise;
  a model whose ``nn.MultiheadAttention`` was split (open_clip) gets ``model.safetensors`` with the fused
  keys of the original model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blocktrain.trainer.adapters.attention import fused_state_dict, split_attention_modules
from blocktrain.trainer.adapters.surgery import apply_lora, lora_layers, lora_state_dict
from blocktrain.trainer.adapters.trainable import modules_to_save
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import atomic_path, write_json

FORMAT = "blocktrain-lora"
ADAPTER_CONFIG = "lora_config.json"
ADAPTER_WEIGHTS = "lora_adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MERGED_WEIGHTS = "model.safetensors"
PEFT_PREFIX = "base_model.model."
_TASK_SUFFIXES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                  ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})


def _base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def exact_names(names: list[str]) -> str:
    """A regex matching exactly these qualified names."""
    return "|".join(re.escape(name) for name in names)


def adapter_config(model: nn.Module) -> dict:
    """The settings of the model's LoRA layers (one rank/alpha/scaling/n_blocks/dropout for all of them)."""
    layers = lora_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no LoRA layers: nothing to export")
    settings = {(m.rank, m.alpha, m.dropout, m.scaling_mode, m.n_blocks) for m in layers.values()}
    if len(settings) > 1:
        raise UserError("the LoRA layers differ in rank/alpha/dropout/scaling/n_blocks; an adapter holds one setting")
    rank, alpha, dropout, scaling, n_blocks = settings.pop()
    return {"format": FORMAT, "version": 1, "base_model": _base_model_name(model), "model_class": type(model).__name__,
            "rank": rank, "alpha": alpha, "dropout": dropout, "scaling": scaling, "n_blocks": n_blocks,
            "targets": list(layers), "modules_to_save": list(modules_to_save(model))}


def save_adapter(model: nn.Module, out_dir: str | Path) -> list[Path]:
    """Write our adapter format (config JSON + safetensors of ``lora_state_dict``); return the paths."""
    out_dir = Path(out_dir)
    config = adapter_config(model)
    save_tensors(lora_state_dict(model), out_dir / ADAPTER_WEIGHTS)
    write_json(out_dir / ADAPTER_CONFIG, config)
    return [out_dir / ADAPTER_CONFIG, out_dir / ADAPTER_WEIGHTS]


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_adapter``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter written by ``save_adapter`` into ``model`` (in place) and return it.

    A model without LoRA layers gets them first, as the adapter's config says; a model that has them
    must have the same layers and settings.
    """
    path = Path(path)
    if not is_adapter_dir(path):
        raise UserError(f"not a LoRA adapter folder (no {ADAPTER_CONFIG}): {path}")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise UserError(f"{path / ADAPTER_CONFIG} is not a {FORMAT} config (format={config.get('format')!r})")
    if not lora_layers(model):
        if config["n_blocks"] != 1:
            raise UserError(f"the adapter in {path} has n_blocks={config['n_blocks']} (a LoRA variant): load it "
                            "with the plugin that wrote it (e.g. blocklora), or put that variant's layers on the "
                            "model first")
        apply_lora(model, targets=exact_names(config["targets"]), rank=config["rank"], alpha=config["alpha"],
                   dropout=config["dropout"], scaling=config["scaling"],
                   modules_to_save=exact_names(config["modules_to_save"]) if config["modules_to_save"] else ())
    have = adapter_config(model)
    for key in ("targets", "modules_to_save", "rank", "alpha", "scaling", "n_blocks"):
        if have[key] != config[key]:
            raise UserError(f"the adapter in {path} does not fit the model's LoRA layers: {key} is "
                            f"{config[key]!r} in the adapter, {have[key]!r} in the model")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise UserError("the model's LoRA layers are merged; unmerge them before loading an adapter")
    saved = load_file(str(path / ADAPTER_WEIGHTS))
    target = lora_state_dict(model)
    missing, unexpected = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or unexpected:
        raise UserError(f"{path / ADAPTER_WEIGHTS} does not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, tensor in target.items():
            if tensor.shape != saved[key].shape:
                raise UserError(f"{key}: shape {tuple(saved[key].shape)} in the adapter, "
                                f"{tuple(tensor.shape)} in the model")
            tensor.copy_(saved[key])
    return model


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (``SEQ_CLS``, ``CAUSAL_LM``, ...), or None."""
    cls = type(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if cls.endswith(suffix):
            return task
    if cls.endswith("ForConditionalGeneration") and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return None


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> list[Path]:
    """Write a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained(base, out_dir)`` loads; return the paths.

    ``scaling="sqrt_rank"`` maps to ``use_rslora``; the adapted layers are listed by full name in
    ``target_modules`` and the modules_to_save by full name in ``modules_to_save``.
    """
    out_dir = Path(out_dir)
    config = adapter_config(model)
    if config["n_blocks"] != 1:
        raise UserError(f"LoRA with n_blocks={config['n_blocks']} (a down-projection shared across input chunks) "
                        "has no PEFT format; export it as 'adapter' or 'merged'")
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    for name, module in modules_to_save(model).items():
        state.update({f"{PEFT_PREFIX}{name}.{k}": v for k, v in module.state_dict().items()})
    peft_config = {
        "peft_type": "LORA",
        "task_type": peft_task_type(model),
        "base_model_name_or_path": base_model_name_or_path or config["base_model"],
        "r": config["rank"],
        "lora_alpha": config["alpha"],
        "lora_dropout": config["dropout"],
        "use_rslora": config["scaling"] == "sqrt_rank",
        "target_modules": config["targets"],
        "modules_to_save": config["modules_to_save"] or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_tensors(state, out_dir / PEFT_WEIGHTS)
    write_json(out_dir / PEFT_CONFIG, peft_config)
    return [out_dir / PEFT_CONFIG, out_dir / PEFT_WEIGHTS]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each LoRA update folded into its weight and no ``lora_*`` keys.

    The model itself is not changed: the result has the plain (un-adapted) model class's keys.
    """
    layers = lora_layers(model)
    for layer in layers.values():
        layer.check_mergeable()
    state = model.state_dict()
    for name, layer in layers.items():
        del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        if not layer.merged:
            w = layer.weight.detach()
            state[f"{name}.weight"] = (w.float() + layer.delta_weight()).to(w.dtype)
    return state


def save_merged(model: nn.Module, out_dir: str | Path) -> list[Path]:
    """Save the merged model so it reloads as the plain model class; return the files written.

    transformers: ``save_pretrained`` (reload with ``from_pretrained(out_dir)``); timm: ``model.safetensors`` +
    ``config.json`` (reload with ``timm.create_model("local-dir:" + out_dir, pretrained=True)``); any other
    module: ``model.safetensors`` (``load_state_dict`` into the plain model). A model with split attention:
    ``model.safetensors`` with ``nn.MultiheadAttention``'s fused keys (open_clip's own loader reads them).
    """
    out_dir = Path(out_dir)
    state = merged_state_dict(model)
    if split_attention_modules(model):
        save_tensors(fused_state_dict(model, state), out_dir / MERGED_WEIGHTS)
        return [out_dir / MERGED_WEIGHTS]
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        model.save_pretrained(out_dir, state_dict=state)
        return sorted(p for p in out_dir.iterdir() if p.is_file())
    save_tensors(state, out_dir / MERGED_WEIGHTS)
    if hasattr(model, "pretrained_cfg"):
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(out_dir / "config.json"))
        return [out_dir / "config.json", out_dir / MERGED_WEIGHTS]
    return [out_dir / MERGED_WEIGHTS]
