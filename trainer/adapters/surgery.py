"""Putting ``LoraLinear`` layers on a model and taking their updates in and out (core: no Lightning, no Hydra)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from blocktrain.trainer.adapters.attention import split_multihead_attention
from blocktrain.trainer.adapters.checks import check_lora_args
from blocktrain.trainer.adapters.layer import LoraLinear, LoraVariant
from blocktrain.trainer.adapters.quantized import lora_layer
from blocktrain.trainer.adapters.targeting import Targets, select_targets
from blocktrain.trainer.adapters.trainable import keep_trainable, modules_to_save, select_modules_to_save
from blocktrain.trainer.errors import UserError


def _tied_weight_names(model: nn.Module) -> set[str]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's ``LoraLinear`` layers (any variant) by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, targets: Targets, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               scaling: str = "rank", variant: LoraVariant | None = None, encoder: str = "both",
               layers: Sequence[int] | None = None, split_attention: bool = False, modules_to_save: Targets = (),
               what: str = "LoRA") -> nn.Module:
    """Replace the targeted Linear layers of ``model`` by LoRA layers of ``variant`` (plain LoRA by default), in
    place, and freeze the rest. Returns ``model``. A quantized base (bitsandbytes 4/8-bit, ``QuantLinear``)
    gets the LoRA layer its type selects (``quantized.lora_layer``) and stays quantized and frozen.

    Targets are chosen by ``select_targets`` (names or a regex, a CLIP tower, a layer range);
    ``split_attention`` first turns every ``nn.MultiheadAttention`` into q/k/v/out_proj Linears. Only the
    adapter and ``modules_to_save`` (any modules, chosen like ``targets``; e.g. a classification head)
    stay trainable. ``what`` names the adapter in messages.
    """
    check_lora_args(rank, alpha, dropout, scaling)
    variant = variant or LoraVariant()
    if lora_layers(model):
        raise UserError(f"{type(model).__name__} already has LoRA layers; apply {what} once")
    if split_attention:
        split_multihead_attention(model)
    names = select_targets(model, targets, encoder, layers, what)
    saved = select_modules_to_save(model, modules_to_save, adapted=names)
    wrap_linears(model, names, lambda linear: lora_layer(linear, rank, alpha, dropout, scaling, variant), what,
                 input_blocks=variant.input_blocks)
    keep_trainable(model, saved)
    return model


def wrap_linears(model: nn.Module, names: list[str], make_layer: Callable[[nn.Module], nn.Module], what: str,
                 input_blocks: int = 1) -> None:
    """Freeze ``model`` and replace each named Linear by ``make_layer(linear)``, after checking all of them.

    Refused: a Linear that ``nn.MultiheadAttention`` reads without calling it (its ``out_proj``), a
    Linear whose weight is tied to another module, an input width not divisible by ``input_blocks``.
    """
    modules = dict(model.named_modules())
    tied = _tied_weight_names(model)
    for name in names:
        if isinstance(modules[name.rpartition(".")[0]], nn.MultiheadAttention):
            raise UserError(f"{what} target {name}: nn.MultiheadAttention uses its out_proj weight without calling "
                            "the layer, so an adapter there would be ignored; split the attention first")
        if f"{name}.weight" in tied:
            raise UserError(f"{what} target {name} shares its weight with another module (tied weights); "
                            "merging would change both. Choose other targets")
        width = modules[name].in_features
        if width % input_blocks:
            raise UserError(f"{what} target {name}: in_features {width} is not divisible by n_blocks {input_blocks} "
                            "(the input is cut into n_blocks equal chunks)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, make_layer(modules[name]))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (W ← W + s·ΔW); forwards then skip the adapters."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora`` (W ← W − s·ΔW)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors: ``<layer>.lora_A`` / ``<layer>.lora_B`` and every modules_to_save tensor."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    for name, module in modules_to_save(model).items():
        state.update({f"{name}.{k}": v.detach() for k, v in module.state_dict().items()})
    return state
