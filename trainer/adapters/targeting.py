"""Choosing the modules an adapter goes on (core: no Lightning, no Hydra): names by suffix or a regex, the
Linear layers among them (``nn.Linear`` or a quantized Linear the adapter library has a layer for), narrowed to a CLIP tower (``encoder``) and an encoder-layer range (``layers``).
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence, Union

from torch import nn

from blocktrain.trainer.adapters.checks import check_encoder, check_layers
from blocktrain.trainer.adapters.quantized import lora_class
from blocktrain.trainer.errors import UserError

log = logging.getLogger(__name__)
Targets = Union[str, Iterable[str]]
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|resblocks|blocks|h)\.(\d+)(?:\.|$)")
_OPEN_CLIP_TOWERS = {"vision": ("visual",), "text": ("transformer", "text")}


def name_matches(name: str, targets: Targets) -> bool:
    """Whether a qualified module name is chosen: a regex string matches it in full; a list entry
    matches a name equal to it or ending in ``.entry`` (as PEFT's ``target_modules``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def matchers(targets: Targets, what: str) -> list:
    """One matcher per listed name (so each can be required to match), or the regex string itself."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise UserError(f"{what} {targets!r} is not a valid regex: {exc}") from None
        return [targets]
    return [[str(t)] for t in targets]


def label(matcher) -> str:
    return repr(matcher if isinstance(matcher, str) else matcher[0])


def examples(names: Iterable[str], limit: int = 12) -> str:
    """Short names (last parts) of ``names`` with three full ones, for error messages."""
    names = list(names)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    text = ", ".join(short[:limit]) + (", ..." if len(short) > limit else "")
    return f"{text} (e.g. {', '.join(names[:3])})" if names else "none"


def select_linears(model: nn.Module, targets: Targets) -> list[str]:
    """Qualified names of the Linear layers chosen by ``targets``: ``nn.Linear`` or a quantized Linear
    (bitsandbytes 4/8-bit, ``QuantLinear``), any layer ``quantized.LAYERS`` has a LoRA layer for.

    ``targets`` is a list of module names, each matching a qualified name equal to it or ending in
    ``.name`` (as PEFT's ``target_modules``), or a regex string matched in full against the qualified name.
    Every listed name (or the regex) must match at least one of them.
    """
    modules = {n: m for n, m in model.named_modules() if n}
    linears = [n for n, m in modules.items() if lora_class(m) is not None]
    chosen = matchers(targets, "LoRA targets")
    if not chosen:
        raise UserError("LoRA targets is empty: list module names (e.g. [q_proj, v_proj]) or give a regex")
    for matcher in chosen:
        if not any(name_matches(n, matcher) for n in linears):
            others = sorted({type(m).__name__ for n, m in modules.items() if name_matches(n, matcher)})
            found = f" It matches only non-Linear modules ({', '.join(others)})." if others else ""
            raise UserError(f"LoRA target {label(matcher)} matches no nn.Linear (or quantized Linear) in "
                            f"{type(model).__name__}.{found} "
                            f"Linear layers: {examples(linears)}")
    return [n for n in linears if any(name_matches(n, m) for m in chosen)]


def is_open_clip(model: nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "open_clip"


def _tower_kind(module: nn.Module) -> str | None:
    model_type = getattr(getattr(module, "config", None), "model_type", None) or ""
    for kind in ("vision", "text"):
        if model_type.endswith(f"_{kind}_model"):  # clip_vision_model, siglip_text_model, ...
            return kind
    return None


def inside(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one (``""`` = the whole model)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def clip_towers(model: nn.Module) -> dict[str, list[str]]:
    """Qualified names of the model's CLIP towers, ``{"vision": [...], "text": [...]}`` (``""`` = the model
    itself, e.g. a ``CLIPVisionModel``); empty for a model that is not CLIP-style.

    transformers: the outermost modules whose config's ``model_type`` ends in ``_vision_model`` /
    ``_text_model`` (CLIP, SigLIP, ...). open_clip: ``visual``, and ``transformer`` or ``text``.
    """
    towers: dict[str, list[str]] = {"vision": [], "text": []}
    if is_open_clip(model):
        children = dict(model.named_children())
        for kind, names in _OPEN_CLIP_TOWERS.items():
            towers[kind] = [n for n in names if n in children]
    else:
        for name, module in model.named_modules():
            kind = _tower_kind(module)
            if kind and not inside(name, towers["vision"] + towers["text"]):
                towers[kind].append(name)
    return {kind: names for kind, names in towers.items() if names}


def layer_index(name: str) -> int | None:
    """The encoder-layer index in a qualified name (``...layers.3...``, ``...resblocks.3...``), or None."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _pick_layers(names: list[str], span: tuple[int, int], scopes: dict[str, list[str]], what: str) -> list[str]:
    start, end = span
    chosen = [n for n in names if (i := layer_index(n)) is not None and start <= i < end]
    for scope, prefixes in scopes.items():
        if not any(inside(n, prefixes) for n in names):
            continue  # e.g. the text tower when only vision targets were named
        indices = sorted({layer_index(n) for n in names if inside(n, prefixes)} - {None})
        if not indices:
            raise UserError(f"{what} layers [{start}, {end}): no target of the {scope} lies in a numbered "
                            "layer (...layers.<i>..., ...resblocks.<i>..., ...blocks.<i>...)")
        if not any(inside(n, prefixes) for n in chosen):
            raise UserError(f"{what} layers [{start}, {end}) selects no target of the {scope}: its targets "
                            f"are in layers {indices[0]}..{indices[-1]}")
    if not chosen:
        raise UserError(f"{what} layers [{start}, {end}): none of the targets lies in a numbered layer")
    outside = [n for n in names if layer_index(n) is None]
    if outside:
        log.info("%s: layers=[%d, %d) leaves out %d targets outside numbered layers (e.g. %s)",
                 what, start, end, len(outside), outside[0])
    return chosen


def select_targets(model: nn.Module, targets: Targets, encoder: str = "both", layers: Sequence[int] | None = None,
                   what: str = "LoRA") -> list[str]:
    """Qualified names of the Linear layers (plain or quantized) an adapter goes on.

    ``targets`` as in ``select_linears``; ``encoder`` (vision | text | both) keeps one CLIP tower's layers
    (ignored, with a log line, for a model that is not CLIP-style); ``layers`` = ``(start, end)`` keeps
    targets in encoder layers start..end-1 of each tower (None: all). ``what`` names the adapter in messages.
    """
    check_encoder(encoder, what)
    span = check_layers(layers, what)
    names = select_linears(model, targets)
    if encoder == "both" and span is None:
        return names
    towers = clip_towers(model)
    if not towers:
        log.log(logging.INFO if encoder == "both" else logging.WARNING,
                "%s: %s is not a CLIP model (no vision/text tower found); encoder=%s is ignored",
                what, type(model).__name__, encoder)
        scopes = {"model": [""]}
    elif encoder == "both":
        scopes = {f"{kind} tower": prefixes for kind, prefixes in towers.items()}
    else:
        if encoder not in towers:
            raise UserError(f"{what} encoder={encoder}: {type(model).__name__} has no {encoder} tower "
                            f"(it has: {', '.join(towers)})")
        names = [n for n in names if inside(n, towers[encoder])]
        if not names:
            raise UserError(f"{what} targets {targets!r} match no nn.Linear in the {encoder} tower of "
                            f"{type(model).__name__} ({', '.join(towers[encoder]) or 'the model itself'})")
        scopes = {f"{encoder} tower": towers[encoder]}
    return names if span is None else _pick_layers(names, span, scopes, what)
