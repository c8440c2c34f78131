"""What trains beside an adapter (core: no Lightning, no Hydra): the modules kept fully trainable
(``modules_to_save``, e.g. a new classification head), the check that no newly initialised weight is left
frozen, and parameter counts.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

from torch import nn

from blocktrain.trainer.adapters.targeting import Targets, examples, label, matchers, name_matches
from blocktrain.trainer.errors import UserError

log = logging.getLogger(__name__)
SAVE_FLAG = "_adapter_module_to_save"  # set on each module kept trainable by keep_trainable


def select_modules_to_save(model: nn.Module, names: Targets, adapted: Sequence[str] = ()) -> list[str]:
    """Qualified names of the modules ``names`` chooses (names by suffix, or a regex); each entry must match.

    A module cannot be both adapted (in ``adapted``) and fully trained: that is refused.
    """
    modules = [n for n, _ in model.named_modules() if n]
    chosen = matchers(names, "modules_to_save")
    for matcher in chosen:
        if not any(name_matches(n, matcher) for n in modules):
            raise UserError(f"modules_to_save entry {label(matcher)} matches no module in {type(model).__name__}. "
                            f"Modules: {examples(modules)}")
    saved = [n for n in modules if any(name_matches(n, m) for m in chosen)]
    for name in adapted:
        inside = [s for s in saved if name == s or name.startswith(s + ".")]
        if inside:
            raise UserError(f"adapter target {name} is in modules_to_save ({inside[0]}): "
                            "a module is either adapted or fully trained, not both")
    return saved


def keep_trainable(model: nn.Module, names: Iterable[str]) -> None:
    """Make the named modules fully trainable and mark them, so ``modules_to_save`` finds them."""
    modules = dict(model.named_modules())
    for name in names:
        setattr(modules[name], SAVE_FLAG, True)
        modules[name].requires_grad_(True)


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The modules ``keep_trainable`` marked, by qualified name (exported with the adapter)."""
    return {n: m for n, m in model.named_modules() if getattr(m, SAVE_FLAG, False)}


def frozen_new_weights(model: nn.Module, new_weights: Iterable[str]) -> list[str]:
    """The parameters among ``new_weights`` (names the model loader initialised itself, not from the
    checkpoint) that nothing trains: they do not require grad."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return sorted(n for n in set(new_weights) if n in params and not params[n].requires_grad)


def check_new_weights_trained(model: nn.Module, new_weights: Iterable[str], plugins: Sequence,
                              init_from: str | None = None) -> None:
    """Before a fit: refuse newly initialised weights (e.g. a new classifier head) that the plugins froze.

    The message names the weights and the ``modules_to_save`` setting of each adapter plugin that
    trains them. With ``init_from`` they may come from that file, so it is a warning instead.
    """
    frozen = frozen_new_weights(model, new_weights)
    if not frozen:
        return
    owners = ",".join(dict.fromkeys(n.rpartition(".")[0] or n for n in frozen))
    fixes = [f"plugin.{p.name}.modules_to_save=[{owners}]" for p in plugins if hasattr(p.config, "modules_to_save")]
    fix = " or ".join(fixes) if fixes else "a plugin setting that keeps them trainable"
    message = (f"{type(model).__name__} has newly initialised weights (not in the checkpoint) that no plugin "
               f"trains: {', '.join(frozen)}. They stay random and frozen through the fit; train them with {fix}")
    if init_from:
        log.warning("%s (unless init_from=%s supplies them)", message, init_from)
        return
    raise UserError(message)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
