"""Layer-by-layer calibration through forward hooks, for methods that prune one layer at a time.

Works on any model: the caller gives target Linear names, re-iterable calibration ``batches`` and a
``forward(model, batch)`` callable. A probe forward on the first batch finds the targets' execution
order and groups consecutive targets that read the very same input tensor (q/k/v, gate/up): a group
shares one statistics object, filled by hooking its first member only. With ``sequential=True`` the
groups are calibrated one after another, each from the model whose earlier groups are already pruned;
otherwise one pass over the unpruned model fills every group. Each pass stops the forward right after
the last hooked layer when every target runs once per forward.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn

__all__ = ["default_forward", "layer_groups", "calibrate_layers"]


class Stats(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: a mapping as keyword arguments, a tuple/list's first item, else the batch."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


class _Stop(Exception):
    """Raised by a hook to end a calibration forward early."""


def _first(batches: Iterable) -> Any:
    for batch in batches:
        return batch
    raise ValueError("no calibration batches")


def layer_groups(model: nn.Module, names: list[str], batch: Any,
                 forward: Callable = default_forward) -> tuple[list[list[str]], bool]:
    """Targets in execution order, grouped where consecutive ones read the same input; and whether each runs once."""
    calls = {name: 0 for name in names}
    groups: list[list[str]] = []
    prev: list[torch.Tensor] = []

    def hook(name):
        def fn(module, args, output):
            calls[name] += 1
            if calls[name] > 1:
                return
            x = args[0]
            same = prev and (x is prev[0] or (x.data_ptr() == prev[0].data_ptr() and x.shape == prev[0].shape
                                              and x.stride() == prev[0].stride() and x.dtype == prev[0].dtype))
            if same:
                groups[-1].append(name)
            else:
                groups.append([name])
                prev[:] = [x]
        return fn

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, n in calls.items() if n == 0]
    if missing:
        raise ValueError(f"these target layers never ran in a forward pass: {missing}")
    return groups, all(n == 1 for n in calls.values())


def _run_pass(model, hooked: dict[str, Stats], batches, forward, stop_after: str | None) -> None:
    def hook(name):
        def fn(module, args, output):
            hooked[name].add(args[0].detach())
            if name == stop_after:
                raise _Stop
        return fn

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in hooked]
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                seen += 1
                try:
                    forward(model, batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("calibration batches ran out: pass a re-iterable (a list or a DataLoader), not a generator")


def calibrate_layers(model: nn.Module, names: list[str], batches: Iterable, forward: Callable,
                     make_stats: Callable[[nn.Module], Stats],
                     finish: Callable[[str, nn.Module, Stats], None], sequential: bool = True) -> None:
    """Fill ``make_stats(module)`` from each group's inputs, then call ``finish(name, module, stats)`` per target."""
    groups, once = layer_groups(model, names, _first(batches), forward)
    stages = [[g] for g in groups] if sequential else [groups]
    for stage in stages:
        hooked = {g[0]: make_stats(model.get_submodule(g[0])) for g in stage}
        _run_pass(model, hooked, batches, forward, stage[-1][0] if once else None)
        for g in stage:
            for name in g:
                finish(name, model.get_submodule(name), hooked[g[0]])
