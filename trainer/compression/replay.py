"""Layer-by-layer calibration through forward hooks, for methods that prune one layer at a time.

Works on any model: the caller gives target Linear names, re-iterable calibration ``batches`` and a
``forward(model, batch)`` callable. A probe forward on the first batch finds the targets' execution
order and groups consecutive targets that read the very same input tensor (q/k/v, gate/up): a group
shares one statistics object, filled by hooking its first member only. With ``sequential=True`` the
groups are calibrated one after another, each from the model whose earlier groups are already pruned;
otherwise one pass over the unpruned model fills every group. Each pass stops the forward right after
the last hooked layer when every target runs once per forward.

Sequential calibration replays one block at a time when it can: if every target lies in one item of a
``ModuleList`` or ``Sequential`` of blocks (a transformer's layer stack) and each block's first input is the previous
block's output, one forward records each block's inputs, and the groups of block i are then calibrated by
running block i alone on its inputs, whose outputs (from the pruned block) feed block i+1 — the same
numbers as re-running the model for every group, at the cost of a few forwards in all instead of one
forward prefix per group. Other models get the full forward per group.

The same machinery serves methods that replay blocks themselves (CBQ): ``forward_with_hooks`` (calibration
forwards that a hook may stop early), ``capture_inputs`` (a module's arguments per batch, each forward stopped
there) and ``probe_layers`` (the execution order, shared inputs and, given producer modules, which producer's
output each target reads).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn

__all__ = ["default_forward", "StopForward", "forward_with_hooks", "capture_inputs", "Probe", "probe_layers",
           "layer_groups", "calibrate_layers"]


class Stats(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: a mapping as keyword arguments, a tuple/list's first item, else the batch."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


class StopForward(Exception):
    """Raised by a hook to end a calibration forward early (``forward_with_hooks`` catches it)."""


def forward_with_hooks(model: nn.Module, batches: Iterable, forward: Callable, handles: list) -> int:
    """``forward(model, batch)`` without gradients for each batch, a hook raising ``StopForward`` ending that
    batch's forward; the hook ``handles`` are removed afterwards, also on error. Returns the number of batches."""
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                n += 1
                try:
                    forward(model, batch)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return n


def capture_inputs(model: nn.Module, module: nn.Module, batches: Iterable, forward: Callable = default_forward,
                   storage: torch.device | str | None = None) -> list[tuple[tuple, dict]]:
    """``module``'s ``(args, kwargs)`` per batch, each forward stopped as ``module`` is reached; its first
    argument (the hidden state) detached and moved to ``storage`` when given."""
    recorded: list[tuple[tuple, dict]] = []

    def pre(m, args, kwargs):
        first = args[0].detach() if storage is None else args[0].detach().to(storage)
        recorded.append(((first, *args[1:]), kwargs))
        raise StopForward

    forward_with_hooks(model, batches, forward, [module.register_forward_pre_hook(pre, with_kwargs=True)])
    return recorded


def _first(batches: Iterable) -> Any:
    for batch in batches:
        return batch
    raise ValueError("no calibration batches")


@dataclass
class Probe:
    """What one probe forward saw: the targets in execution order, grouped where consecutive ones read the very
    same input tensor; whether each ran exactly once; and, for each target reading the output tensor of one of
    the given producer modules, that producer's name."""

    groups: list[list[str]]
    once: bool
    read_from: dict[str, str]


def probe_layers(model: nn.Module, names: list[str], batch: Any, forward: Callable = default_forward,
                 producers: Iterable[str] = ()) -> Probe:
    """One forward on ``batch`` with hooks on the targets ``names`` (and on ``producers``): see ``Probe``."""
    calls = {name: 0 for name in names}
    groups: list[list[str]] = []
    prev: list[torch.Tensor] = []
    outputs: dict[int, tuple[torch.Tensor, str]] = {}  # producers' outputs, kept so that no id is reused
    read_from: dict[str, str] = {}

    def produced(name):
        def fn(module, args, output):
            outputs[id(output)] = (output, name)
        return fn

    def hook(name):
        def fn(module, args, output):
            calls[name] += 1
            if calls[name] > 1:
                return
            x = args[0]
            source = outputs.get(id(x))
            if source is not None and source[0] is x:
                read_from[name] = source[1]
            same = prev and (x is prev[0] or (x.data_ptr() == prev[0].data_ptr() and x.shape == prev[0].shape
                                              and x.stride() == prev[0].stride() and x.dtype == prev[0].dtype))
            if same:
                groups[-1].append(name)
            else:
                groups.append([name])
                prev[:] = [x]
        return fn

    handles = [model.get_submodule(name).register_forward_hook(produced(name)) for name in producers]
    handles += [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    forward_with_hooks(model, [batch], forward, handles)
    missing = [name for name, n in calls.items() if n == 0]
    if missing:
        raise ValueError(f"these target layers never ran in a forward pass: {missing}")
    return Probe(groups, all(n == 1 for n in calls.values()), read_from)


def layer_groups(model: nn.Module, names: list[str], batch: Any,
                 forward: Callable = default_forward) -> tuple[list[list[str]], bool]:
    """Targets in execution order, grouped where consecutive ones read the same input; and whether each runs once."""
    probe = probe_layers(model, names, batch, forward)
    return probe.groups, probe.once


def _run_pass(modules: dict[str, nn.Module], hooked: dict[str, Stats], model, batches, forward,
              stop_after: str | None) -> None:
    """``forward(model, batch)`` over the batches, feeding ``hooked[name]`` the inputs of ``modules[name]``."""
    def hook(name):
        def fn(module, args, output):
            hooked[name].add(args[0].detach())
            if name == stop_after:
                raise StopForward
        return fn

    forward_with_hooks(model, batches, forward, [modules[name].register_forward_hook(hook(name)) for name in hooked])


# -- block replay ----------------------------------------------------------------------------------
def _block_stack(model: nn.Module, groups: list[list[str]]) -> tuple[str, nn.Module, int, int] | None:
    """The ModuleList or Sequential (timm's ``blocks``) holding the most groups, each inside one of its items
    (the deepest on ties), with its path and the span [start, end) of those groups; None unless they are
    consecutive and at least two."""
    best, best_span = None, (0, 0)
    for path, module in model.named_modules():
        if not path or not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        inside = [i for i, g in enumerate(groups) if all(n.startswith(path + ".") for n in g)
                  and len({n[len(path) + 1:].split(".", 1)[0] for n in g}) == 1]
        if len(inside) >= max(2, best_span[1] - best_span[0]) and inside == list(range(inside[0], inside[-1] + 1)):
            best, best_span = (path, module), (inside[0], inside[-1] + 1)
    return None if best is None else (*best, *best_span)


def _hidden(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _record_block_inputs(model, blocks: nn.Module, batches, forward) -> list[list[tuple[tuple, dict]]] | None:
    """Each block's ``(args, kwargs)`` per batch from one forward, or None unless every block runs once per
    forward and its first argument is the previous block's output."""
    inputs: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    last_output: list[Any] = [None]
    chained = [True]

    def pre(i):
        def fn(module, args, kwargs):
            if not args or not torch.is_tensor(args[0]):
                chained[0] = False
            elif i > 0:
                prev = last_output[0]
                chained[0] &= torch.is_tensor(prev) and (args[0] is prev or (
                    args[0].shape == prev.shape and torch.equal(args[0], prev)))
            inputs[i].append((args if i == 0 else (None, *args[1:]), kwargs))  # later blocks get their args[0] replayed
        return fn

    def post(module, args, kwargs, output):
        last_output[0] = _hidden(output)

    handles = [h for i, block in enumerate(blocks) for h in (block.register_forward_pre_hook(pre(i), with_kwargs=True),
                                                             block.register_forward_hook(post, with_kwargs=True))]
    n = forward_with_hooks(model, batches, forward, handles)
    if not chained[0] or any(len(per_block) != n for per_block in inputs):
        return None
    return inputs


def _replay(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[Any]:
    with torch.no_grad():
        return [_hidden(block(*args, **kwargs)) for args, kwargs in inputs]


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """transformers models: no key/value cache during calibration (a replayed block must not append to one)."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old:
        config.use_cache = False
    try:
        yield
    finally:
        if old:
            config.use_cache = old


def _calibrate_by_block(model, path: str, blocks: nn.Module, groups: list[list[str]], batches, forward, make_stats,
                        finish) -> bool:
    """Sequential calibration of ``groups`` (all inside ``blocks``) replaying one block at a time; False (nothing
    done) unless the blocks form a chain."""
    def block_of(name: str) -> int:
        return int(name[len(path) + 1:].split(".", 1)[0])

    recorded = _record_block_inputs(model, blocks, batches, forward)
    if recorded is None:
        return False
    hidden = [args[0] for args, _ in recorded[0]]
    last = max(block_of(g[0]) for g in groups)
    for i in range(last + 1):
        block = blocks[i]
        inputs = [((h, *args[1:]), kwargs) for h, (args, kwargs) in zip(hidden, recorded[i])]
        for group in (g for g in groups if block_of(g[0]) == i):
            module = model.get_submodule(group[0])
            hooked = {group[0]: make_stats(module)}
            _run_pass({group[0]: module}, hooked, block, inputs, lambda b, ak: b(*ak[0], **ak[1]), group[0])
            for name in group:
                finish(name, model.get_submodule(name), hooked[group[0]])
        if i < last:
            hidden = _replay(block, inputs)
    return True


def calibrate_layers(model: nn.Module, names: list[str], batches: Iterable, forward: Callable,
                     make_stats: Callable[[nn.Module], Stats],
                     finish: Callable[[str, nn.Module, Stats], None], sequential: bool = True) -> None:
    """Fill ``make_stats(module)`` from each group's inputs, then call ``finish(name, module, stats)`` per target."""
    if iter(batches) is batches:
        raise ValueError("calibration batches are read several times: pass a re-iterable (a list or a DataLoader), "
                         "not a generator or iterator")
    with _no_kv_cache(model):
        groups, once = layer_groups(model, names, _first(batches), forward)
        modules = {name: model.get_submodule(name) for name in names}

        def by_forward(stages) -> None:
            for stage in stages:
                hooked = {g[0]: make_stats(modules[g[0]]) for g in stage}
                _run_pass(modules, hooked, model, batches, forward, stage[-1][0] if once else None)
                for g in stage:
                    for name in g:
                        finish(name, modules[name], hooked[g[0]])

        if not sequential:
            by_forward([groups])
            return
        stack = _block_stack(model, groups) if once else None
        start, end = stack[2:] if stack else (len(groups), len(groups))
        by_forward([g] for g in groups[:start])  # targets before the block stack (rare)
        if stack and _calibrate_by_block(model, *stack[:2], groups[start:end], batches, forward, make_stats, finish):
            start = end
        by_forward([g] for g in groups[start:])  # after it (a classifier head), or all when it is no chain
