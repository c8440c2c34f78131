"""Choosing Block-LoRA targets (CLIP towers, a layer range) and replacing them (core: no Lightning, no Hydra).

Targets are chosen as in the ``lora`` plugin (``select_linears``: Linear names by suffix, or a regex),
then narrowed to a CLIP tower (``encoder``) and an encoder-layer range (``layers``). Merging, the adapter's
state dict and parameter counts are the ``lora`` plugin's (``merge_lora``, ``unmerge_lora``,
``lora_state_dict``, ``count_parameters``): they work on every ``LoraLinear``, these layers included.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence

from torch import nn

from blocktrain.plugins.blocklora.attention import SplitMultiheadAttention
from blocktrain.plugins.blocklora.checks import check_block_lora_args, check_encoder, check_layers
from blocktrain.plugins.blocklora.layers import BlockLoraLinear, SumRankLoraLinear, block_lora_layer
from blocktrain.plugins.lora.surgery import lora_layers, select_linears, wrap_linears
from blocktrain.trainer.adapters import Targets, keep_trainable, select_modules_to_save
from blocktrain.trainer.errors import UserError

log = logging.getLogger(__name__)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|resblocks|blocks|h)\.(\d+)(?:\.|$)")
_OPEN_CLIP_TOWERS = {"vision": ("visual",), "text": ("transformer", "text")}


def _is_open_clip(model: nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "open_clip"


def _tower_kind(module: nn.Module) -> str | None:
    model_type = getattr(getattr(module, "config", None), "model_type", None) or ""
    for kind in ("vision", "text"):
        if model_type.endswith(f"_{kind}_model"):  # clip_vision_model, siglip_text_model, ...
            return kind
    return None


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def clip_towers(model: nn.Module) -> dict[str, list[str]]:
    """Qualified names of the model's CLIP towers, ``{"vision": [...], "text": [...]}`` (``""`` = the model
    itself, e.g. a ``CLIPVisionModel``); empty for a model that is not CLIP-style.

    transformers: the outermost modules whose config's ``model_type`` ends in ``_vision_model`` /
    ``_text_model`` (CLIP, SigLIP, ...). open_clip: ``visual``, and ``transformer`` or ``text``.
    """
    towers: dict[str, list[str]] = {"vision": [], "text": []}
    if _is_open_clip(model):
        children = dict(model.named_children())
        for kind, names in _OPEN_CLIP_TOWERS.items():
            towers[kind] = [n for n in names if n in children]
    else:
        for name, module in model.named_modules():
            kind = _tower_kind(module)
            if kind and not _inside(name, towers["vision"] + towers["text"]):
                towers[kind].append(name)
    return {kind: names for kind, names in towers.items() if names}


def layer_index(name: str) -> int | None:
    """The encoder-layer index in a qualified name (``...layers.3...``, ``...resblocks.3...``), or None."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _pick_layers(names: list[str], span: tuple[int, int], scopes: dict[str, list[str]]) -> list[str]:
    start, end = span
    chosen = [n for n in names if (i := layer_index(n)) is not None and start <= i < end]
    for scope, prefixes in scopes.items():
        if not any(_inside(n, prefixes) for n in names):
            continue  # e.g. the text tower when only vision targets were named
        indices = sorted({layer_index(n) for n in names if _inside(n, prefixes)} - {None})
        if not indices:
            raise UserError(f"Block-LoRA layers [{start}, {end}): no target of the {scope} lies in a numbered "
                            "layer (...layers.<i>..., ...resblocks.<i>..., ...blocks.<i>...)")
        if not any(_inside(n, prefixes) for n in chosen):
            raise UserError(f"Block-LoRA layers [{start}, {end}) selects no target of the {scope}: its targets "
                            f"are in layers {indices[0]}..{indices[-1]}")
    if not chosen:
        raise UserError(f"Block-LoRA layers [{start}, {end}): none of the targets lies in a numbered layer")
    outside = [n for n in names if layer_index(n) is None]
    if outside:
        log.info("Block-LoRA: layers=[%d, %d) leaves out %d targets outside numbered layers (e.g. %s)",
                 start, end, len(outside), outside[0])
    return chosen


def select_block_lora_targets(model: nn.Module, targets: Targets, encoder: str = "both",
                              layers: Sequence[int] | None = None) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers Block-LoRA adapts.

    ``targets`` as in the ``lora`` plugin's ``select_linears``; ``encoder`` (vision | text | both) keeps one
    CLIP tower's layers (ignored, with a log line, for a model that is not CLIP-style); ``layers`` =
    ``(start, end)`` keeps targets in encoder layers start..end-1 of each tower (None: all).
    """
    check_encoder(encoder)
    span = check_layers(layers)
    names = select_linears(model, targets)
    towers = clip_towers(model)
    if not towers:
        log.log(logging.INFO if encoder == "both" else logging.WARNING,
                "Block-LoRA: %s is not a CLIP model (no vision/text tower found); encoder=%s is ignored",
                type(model).__name__, encoder)
        scopes = {"model": [""]}
    elif encoder == "both":
        scopes = {f"{kind} tower": prefixes for kind, prefixes in towers.items()}
    else:
        if encoder not in towers:
            raise UserError(f"Block-LoRA encoder={encoder}: {type(model).__name__} has no {encoder} tower "
                            f"(it has: {', '.join(towers)})")
        names = [n for n in names if _inside(n, towers[encoder])]
        if not names:
            raise UserError(f"Block-LoRA targets {targets!r} match no nn.Linear in the {encoder} tower of "
                            f"{type(model).__name__} ({', '.join(towers[encoder]) or 'the model itself'})")
        scopes = {f"{encoder} tower": towers[encoder]}
    return names if span is None else _pick_layers(names, span, scopes)


def split_multihead_attention(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Replace ``nn.MultiheadAttention`` modules (all, or those ``names``) by ``SplitMultiheadAttention``
    in place; returns their qualified names."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if n and isinstance(m, nn.MultiheadAttention)]
    names = list(names)
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.MultiheadAttention):
            raise UserError(f"{name} is not an nn.MultiheadAttention in {type(model).__name__} "
                            f"(it is {type(module).__name__ if module is not None else 'missing'})")
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, SplitMultiheadAttention(module))
    return names


def block_lora_layers(model: nn.Module) -> dict[str, BlockLoraLinear | SumRankLoraLinear]:
    """The model's Block-LoRA layers by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (BlockLoraLinear, SumRankLoraLinear))}


def apply_block_lora(model: nn.Module, targets: Targets = ("q_proj", "k_proj", "v_proj"), rank: int = 2,
                     n_blocks: int = 8, alpha: float = 1.0, scaling: str = "sqrt_rank", dropout: float = 0.25,
                     dropout_position: str = "before_sum", mode: str = "tile_input", encoder: str = "both",
                     layers: Sequence[int] | None = None, split_attention: bool | None = None,
                     modules_to_save: Targets = ()) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by Block-LoRA layers (in place) and freeze everything else
    but ``modules_to_save`` (any modules, chosen like ``targets``; e.g. a new classification head).

    ``mode``: ``tile_input`` (Reading A, ``BlockLoraLinear``; needs n_blocks | in_features) or ``sum_rank``
    (Reading B, ``SumRankLoraLinear``; needs n_blocks | rank). ``split_attention`` first turns every
    ``nn.MultiheadAttention`` into ``SplitMultiheadAttention`` so q/k/v/out_proj can be targeted
    (None: only for open_clip models). Defaults are the spec's (CLIP-LoRA's r, α, dropout; n = 8).
    Returns ``model``.
    """
    check_block_lora_args(rank, alpha, dropout, scaling, n_blocks, mode, dropout_position)
    if lora_layers(model):
        raise UserError(f"{type(model).__name__} already has LoRA layers; apply (Block-)LoRA once")
    if split_attention is None:
        split_attention = _is_open_clip(model)
    if split_attention:
        split_multihead_attention(model)
    names = select_block_lora_targets(model, targets, encoder, layers)
    saved = select_modules_to_save(model, modules_to_save, adapted=names)
    wrap_linears(model, names, lambda linear: block_lora_layer(linear, mode, rank, alpha, dropout, scaling, n_blocks,
                                                               dropout_position),
                 "Block-LoRA", input_blocks=n_blocks if mode == "tile_input" else 1)
    keep_trainable(model, saved)
    towers = clip_towers(model)
    per_tower = ", ".join(f"{kind} {sum(_inside(n, p) for n in names)}" for kind, p in towers.items())
    log.info("Block-LoRA (%s, r=%d, n=%d): adapted %d Linear layers%s", mode, rank, n_blocks, len(names),
             f" ({per_tower})" if per_tower else "")
    return model
