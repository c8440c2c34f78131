"""Block-LoRA's adapter format (core: no Lightning, no Hydra): the adapter library's files
(``lora_config.json`` with rank, alpha, scaling, n_blocks and the adapted layers;
``lora_adapter.safetensors`` with every ``lora_A``/``lora_B``) plus ``blocklora_config.json`` (mode,
dropout position, split attention modules). What ``init_from`` loads. The merged model is the library's
``save_merged`` (it fuses split attention back).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from blocktrain.plugins.blocklora.surgery import apply_block_lora, block_lora_layers
from blocktrain.trainer.adapters.attention import split_attention_modules, split_multihead_attention
from blocktrain.trainer.adapters.export import ADAPTER_CONFIG, exact_names, is_adapter_dir, load_adapter, save_adapter
from blocktrain.trainer.adapters.surgery import lora_layers
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import write_json

FORMAT = "blocktrain-blocklora"
BLOCK_CONFIG = "blocklora_config.json"


def block_adapter_config(model: nn.Module) -> dict:
    """What the ``lora`` adapter files do not say: mode, dropout position and the split attention modules."""
    layers = lora_layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} has no Block-LoRA layers: nothing to export")
    if len(block_lora_layers(model)) != len(layers):
        raise UserError(f"{type(model).__name__} has plain LoRA layers (not Block-LoRA): "
                        "export them with the lora plugin")
    settings = {(m.variant.mode, m.variant.dropout_position) for m in layers.values()}
    if len(settings) > 1:
        raise UserError("the Block-LoRA layers differ in mode/dropout_position; an adapter holds one setting")
    mode, dropout_position = settings.pop()
    return {"format": FORMAT, "version": 1, "mode": mode, "dropout_position": dropout_position,
            "split_attention": list(split_attention_modules(model))}


def save_block_adapter(model: nn.Module, out_dir: str | Path) -> list[Path]:
    """Write our Block-LoRA adapter (the lora adapter files + ``blocklora_config.json``); return the paths."""
    out_dir = Path(out_dir)
    config = block_adapter_config(model)
    written = save_adapter(model, out_dir)
    write_json(out_dir / BLOCK_CONFIG, config)  # last: it marks a complete Block-LoRA adapter
    return [*written, out_dir / BLOCK_CONFIG]


def is_block_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``save_block_adapter``."""
    return (Path(path) / BLOCK_CONFIG).is_file() and is_adapter_dir(path)


def load_block_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter written by ``save_block_adapter`` into ``model`` (in place) and return it.

    A model without LoRA layers gets them first, as the adapter says; a model that has them must have
    the same mode, layers and settings.
    """
    path = Path(path)
    if not is_block_adapter_dir(path):
        raise UserError(f"not a Block-LoRA adapter folder (needs {BLOCK_CONFIG} and {ADAPTER_CONFIG}): {path}")
    config = json.loads((path / BLOCK_CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise UserError(f"{path / BLOCK_CONFIG} is not a {FORMAT} config (format={config.get('format')!r})")
    if not lora_layers(model):
        lora = json.loads((path / ADAPTER_CONFIG).read_text())
        split_multihead_attention(model, config["split_attention"])
        apply_block_lora(model, targets=exact_names(lora["targets"]), rank=lora["rank"], n_blocks=lora["n_blocks"],
                         alpha=lora["alpha"], scaling=lora["scaling"], dropout=lora["dropout"],
                         dropout_position=config["dropout_position"], mode=config["mode"], split_attention=False,
                         modules_to_save=exact_names(lora["modules_to_save"]) if lora["modules_to_save"] else ())
    have = block_adapter_config(model)
    if have["mode"] != config["mode"]:
        raise UserError(f"the adapter in {path} is Block-LoRA mode {config['mode']}, the model's layers are "
                        f"mode {have['mode']}")
    return load_adapter(model, path)
