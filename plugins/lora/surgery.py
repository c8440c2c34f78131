"""Finding target ``nn.Linear`` layers and replacing them with ``LoraLinear`` (core: no Lightning, no Hydra)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from blocktrain.plugins.lora.checks import check_lora_args
from blocktrain.plugins.lora.layers import LoraLinear
from blocktrain.trainer.adapters import (Targets, examples, keep_trainable, label, matchers, modules_to_save,
                                         name_matches, select_modules_to_save)
from blocktrain.trainer.errors import UserError


def select_linears(model: nn.Module, targets: Targets) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers chosen by ``targets``.

    ``targets`` is a list of module names, each matching a qualified name equal to it or ending in
    ``.name`` (as PEFT's ``target_modules``), or a regex string matched in full against the qualified name.
    Every listed name (or the regex) must match at least one ``nn.Linear``.
    """
    modules = {n: m for n, m in model.named_modules() if n}
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    chosen = matchers(targets, "LoRA targets")
    if not chosen:
        raise UserError("LoRA targets is empty: list module names (e.g. [q_proj, v_proj]) or give a regex")
    for matcher in chosen:
        if not any(name_matches(n, matcher) for n in linears):
            others = sorted({type(m).__name__ for n, m in modules.items() if name_matches(n, matcher)})
            found = f" It matches only non-Linear modules ({', '.join(others)})." if others else ""
            raise UserError(f"LoRA target {label(matcher)} matches no nn.Linear in {type(model).__name__}.{found} "
                            f"Linear layers: {examples(linears)}")
    return [n for n in linears if any(name_matches(n, m) for m in chosen)]


def _tied_weight_names(model: nn.Module) -> set[str]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's ``LoraLinear`` layers by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, targets: Targets, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               scaling: str = "rank", n_blocks: int = 1, modules_to_save: Targets = ()) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by ``LoraLinear`` (in place) and freeze the rest.

    Only the LoRA parameters and the parameters of ``modules_to_save`` (any modules, chosen like
    ``targets``: names or a regex; e.g. a classification head) stay trainable. Returns ``model``.
    """
    check_lora_args(rank, alpha, dropout, scaling, n_blocks)
    if lora_layers(model):
        raise UserError(f"{type(model).__name__} already has LoRA layers; apply LoRA once")
    names = select_linears(model, targets)
    saved = select_modules_to_save(model, modules_to_save, adapted=names)
    wrap_linears(model, names, lambda linear: LoraLinear(linear, rank, alpha, dropout, scaling, n_blocks), "LoRA",
                 input_blocks=n_blocks)
    keep_trainable(model, saved)
    return model


def wrap_linears(model: nn.Module, names: list[str], make_layer: Callable[[nn.Linear], nn.Module], what: str,
                 input_blocks: int = 1) -> None:
    """Freeze ``model`` and replace each named ``nn.Linear`` by ``make_layer(linear)``, after checking all of them.

    Refused: a Linear that ``nn.MultiheadAttention`` reads without calling it (its ``out_proj``), a
    Linear whose weight is tied to another module, an input width not divisible by ``input_blocks``.
    Shared by the LoRA-style surgeries (``lora``, ``blocklora``).
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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
