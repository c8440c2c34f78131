"""CBQ's functional core: ``cbq_quantize(model, batches, spec, act, settings)`` quantizes every target Linear of a
model's block stack by cross-block reconstruction, without the engine.

1. CFP (``cfp.py``) on the full-precision model: activation-outlier scales folded (the same function), weight-outlier
   clip thresholds for the quantizers' ranges (the full-precision weights, hence the targets, are kept).
2. The inputs of the first block are recorded once per calibration batch (X_fp = X_q), kept on ``storage``
   (the CPU by default): only the batch of the current step is on the model's device.
3. For each sliding window (``windows.py``): its Linears become ``CBQLinear`` (a block shared with the previous
   window keeps what it learned there); the targets T_fp(X_fp) and T_fp(X_q) are computed once; then
   ``epochs`` passes over the batches minimise the homologous loss (``loss.py``) plus λ·Σ(1 − |2h − 1|^β)
   (``rounding.py``) over S^W, (A1, A2) and S^X jointly. The blocks leaving the window are hard-rounded into
   ``QuantLinear`` and X_fp, X_q advance through them (X_fp through the full-precision block, X_q through the
   quantized one).

The loop takes its optimiser from ``learn`` (the engine passes ``compression.learn.learn``; alone, a plain Adam
loop), reports each window through ``log`` and ``on_window`` (a snapshot to resume from: ``resume=``).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from blocktrain.plugins.cbq.cfp import cfp_preprocess
from blocktrain.plugins.cbq.loss import homologous_loss
from blocktrain.plugins.cbq.quantizer import CBQLinear
from blocktrain.plugins.cbq.rounding import BetaSchedule, rounding_regularizer
from blocktrain.plugins.cbq.settings import CFPSettings
from blocktrain.plugins.cbq.windows import Window, window_schedule
from blocktrain.trainer.compression.calibration import calibration_forward, to_device
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import ActQuantSpec, QuantSpec
from blocktrain.trainer.compression.quantizing import replace_with_quant_linears
from blocktrain.trainer.compression.replay import capture_inputs

__all__ = ["CBQSettings", "find_blocks", "cbq_quantize", "adam_learn"]


@dataclass(frozen=True)
class CBQSettings:
    """The method's settings (the plugin's config maps onto these)."""

    window: int = 2  # blocks per window
    overlap: int = 1  # blocks shared by consecutive windows
    rank: int = 5  # LoRA-Rounding rank r; 0 = full AdaRound V
    init: str = "svd"  # svd (truncated SVD of AdaRound's V0) | zero (A1 = 0)
    frozen_base: bool = True  # V = (V0 − A1A2 at init, frozen) + A1A2: starts at V0; false: V = A1A2 alone
    reg_weight: float = 0.01  # λ of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of a window's steps without the regulariser
    epochs: int = 10  # passes over the calibration batches per window
    rounding_lr: float | None = None  # learning rate of the rounding parameters (A1, A2 or V); None: the optimiser's
    kl_weight: float = 1.0  # weight of the KL term in E
    two_branch: bool = True  # false: only E(T_fp(X_fp), T_q(X_q))
    keep_better: bool = True  # a window whose hardened loss ends above its start keeps its start (RTN at first)
    cfp: CFPSettings = field(default_factory=CFPSettings)
    seed: int = 0  # A2's random init (init=zero)


def find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` holding the most target Linears (a transformer's layer stack); every target must lie
    inside it."""
    best, best_count = None, 0
    for path, module in model.named_modules():
        if path and isinstance(module, nn.ModuleList):
            count = sum(n.startswith(path + ".") for n in names)
            if count > best_count:
                best, best_count = (path, module), count
    if best is None:
        raise ValueError("the model has no ModuleList of blocks (a transformer's layer stack) holding the target "
                         "Linears; CBQ reconstructs block by block")
    outside = [n for n in names if not n.startswith(best[0] + ".")]
    if outside:
        raise ValueError(f"CBQ reconstructs the blocks of {best[0]}, but {len(outside)} target Linear(s) lie outside "
                         f"it, e.g. {outside[0]}; leave them out (exclude)")
    return best


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def adam_learn(params: list, loss_fn: Callable[[Any], torch.Tensor], batches: Iterable, steps: int, name: str,
               lr: float = 1e-3) -> list[float]:
    """The loop used without the engine: Adam at ``lr`` for ``steps`` steps over ``batches`` (cycled)."""
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _, batch in zip(range(steps), itertools.cycle(batches)):
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


_OPEN_KEYS = ("weight", "bias", "keep", "scale0", "zero")  # rebuilt from the model, not saved


class _Session:
    """One ``cbq_quantize`` call's state: the blocks, the cached inputs, the layers wrapped so far."""

    def __init__(self, model, blocks, names, spec, act, settings, keep_zeros, storage, clips):
        self.model, self.blocks, self.spec, self.act, self.s = model, blocks, spec, act, settings
        self.keep_zeros, self.storage, self.clips = keep_zeros, storage, clips
        self.device = next(model.parameters()).device
        self.by_block: dict[int, list[str]] = {}
        prefix = find_blocks(model, names)[0]
        for n in names:
            self.by_block.setdefault(int(n[len(prefix) + 1:].split(".", 1)[0]), []).append(n)
        self.layers: dict[str, CBQLinear] = {}
        self.entries: dict[str, dict] = {}

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def wrap(self, block: int) -> list[CBQLinear]:
        new = []
        for i, name in enumerate(self.by_block.get(block, [])):
            if name not in self.layers:
                gen = torch.Generator().manual_seed(self.s.seed * 100003 + block * 1009 + i)
                layer = CBQLinear(self.model.get_submodule(name), self.spec, self.act, self.s.rank, self.s.init,
                                  self.keep_zeros, gen, self.s.frozen_base, self.clips.get(name))
                self._set(name, layer)
                self.layers[name] = layer
                new.append(layer)
        return new

    def harden(self, block: int) -> None:
        """Block ``block``'s targets become ``QuantLinear``s with the hard-rounded codes and learned steps."""
        self.restore(block, {name: self.layers.pop(name).entry() for name in self.by_block.get(block, [])})

    def restore(self, block: int, entries: dict[str, dict]) -> None:
        """Block ``block``'s targets as the ``QuantLinear``s of ``entries``."""
        mine = {name: entries[name] for name in self.by_block.get(block, [])}
        self.entries.update(mine)
        replace_with_quant_linears(self.model, mine, self.spec, self.act)

    def window_layers(self, w: Window) -> list[CBQLinear]:
        return [self.layers[n] for b in range(w.start, w.stop) for n in self.by_block.get(b, []) if n in self.layers]

    def run(self, start: int, stop: int, x: torch.Tensor, rest: tuple[tuple, dict]) -> torch.Tensor:
        x = x.to(self.device)
        for i in range(start, stop):
            x = _hidden(self.blocks[i](x, *rest[0], **rest[1]))
        return x

    def advance(self, start: int, stop: int, xs: list[torch.Tensor], rests: list) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.run(start, stop, x, r).to(self.storage) for x, r in zip(xs, rests)]

    def snapshot(self, next_window: int, report: list[dict]) -> dict:
        return {"next": next_window, "hardened": dict(self.entries), "report": list(report),
                "open": {n: {k: v.detach().cpu().clone() for k, v in layer.state_dict().items() if k not in _OPEN_KEYS}
                         for n, layer in self.layers.items()}}


def _set_mode(layers: list[CBQLinear], mode: str) -> None:
    for layer in layers:
        layer.mode = mode


def cbq_quantize(model: nn.Module, batches: list, spec: QuantSpec = QuantSpec(4), act: ActQuantSpec | None = None,
                 settings: CBQSettings = CBQSettings(), names: list[str] | None = None,
                 forward: Callable = calibration_forward, learn: Callable | None = None,
                 log: Callable[[dict], None] | None = None, on_window: Callable[[dict], None] | None = None,
                 resume: dict | None = None, keep_zeros: bool = False, storage: str | torch.device = "cpu",
                 lr: float = 1e-3) -> dict[str, dict]:
    """Quantize ``names`` (default: every Linear but ``lm_head``) of ``model`` in place by CBQ; each becomes a
    ``QuantLinear``. Returns ``{name: {"codes", "scale", "zero"[, "act_scale", "act_zero"]}}`` (CPU tensors).

    ``learn(params, loss_fn, batch_indices, steps, name)`` runs a window's optimisation (default: Adam at
    ``lr``); ``log`` gets each window's reconstruction losses; ``on_window`` gets a snapshot after each window,
    which ``resume`` takes back (the same model, batches and settings).
    """
    names = find_linear_names(model, exclude=("lm_head",)) if names is None else list(names)
    _, blocks = find_blocks(model, names)
    storage = torch.device(storage)
    learn = learn or (lambda *a: adam_learn(*a, lr=lr))
    log = log or (lambda values: None)
    s = settings
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        if use_cache:
            config.use_cache = False
        for p in flags:
            p.requires_grad_(False)
        clips = {}
        if s.cfp.enabled:
            cfp = replace(s.cfp, scale_activations=s.cfp.scales_activations(act))
            counts, clips = cfp_preprocess(model, blocks, names, batches, forward, cfp, spec)
            log({f"cbq/cfp/{k}": v for k, v in counts.items()})
        return _reconstruct(_Session(model, blocks, names, spec, act, s, keep_zeros, storage, clips), batches, forward,
                            learn, log, on_window, resume)
    finally:
        if use_cache:
            config.use_cache = use_cache
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _reconstruct(ses: _Session, batches, forward, learn, log, on_window, resume) -> dict[str, dict]:
    s = ses.s
    recorded = capture_inputs(ses.model, ses.blocks[0], batches, forward, ses.storage)
    x_fp, rests = [args[0] for args, _ in recorded], [(args[1:], kwargs) for args, kwargs in recorded]
    x_q = list(x_fp)
    schedule = window_schedule(len(ses.blocks), s.window, s.overlap)
    first, report = 0, []
    if resume is not None:
        first, report = resume["next"], list(resume["report"])
        done = schedule[first].start if first < len(schedule) else len(ses.blocks)
        if first < len(schedule):  # X_fp through the full-precision blocks, then X_q through the restored ones
            x_fp = ses.advance(0, done, x_fp, rests)
        for b in range(done):
            ses.restore(b, resume["hardened"])
        if first == len(schedule):
            return ses.entries
        x_q = ses.advance(0, done, x_q, rests)
        for b in range(done, len(ses.blocks)):
            if any(n in resume["open"] for n in ses.by_block.get(b, [])):
                ses.wrap(b)
        for name, state in resume["open"].items():
            ses.layers[name].load_state_dict(state, strict=False)
    n = len(batches)
    for k in range(first, len(schedule)):
        w = schedule[k]
        new = [layer for b in range(w.start, w.stop) for layer in ses.wrap(b)]
        if new and ses.act is not None and not ses.act.dynamic:
            _observe_act_ranges(ses, w, new, x_q, rests)
        layers = ses.window_layers(w)
        _set_mode(layers, "fp")
        with torch.no_grad():
            fp_fp = [ses.run(w.start, w.stop, x, r).to(ses.storage) for x, r in zip(x_fp, rests)]
            fp_q = [ses.run(w.start, w.stop, x, r).to(ses.storage) for x, r in zip(x_q, rests)] if s.two_branch else None

        def rec(i: int) -> torch.Tensor:
            out = ses.run(w.start, w.stop, x_q[i], rests[i])
            return homologous_loss(out, fp_fp[i].to(out.device), None if fp_q is None else fp_q[i].to(out.device),
                                   s.kl_weight)

        def mean_rec(mode: str) -> float:
            _set_mode(layers, mode)
            with torch.no_grad():
                return sum(float(rec(i)) for i in range(n)) / n

        start_loss = mean_rec("hard")
        steps = s.epochs * n
        beta = BetaSchedule(steps, s.warmup, s.beta_start, s.beta_end)
        step = [0]

        def loss_fn(i: int) -> torch.Tensor:
            loss = rec(i)
            b = beta(step[0])
            step[0] += 1
            if b is not None and s.reg_weight:
                loss = loss + s.reg_weight * sum(rounding_regularizer(layer.rounding(), b) for layer in layers)
            return loss

        _set_mode(layers, "soft")
        groups = _param_groups(layers, s.rounding_lr)
        params = [p for group in groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        if steps:
            learn(groups, loss_fn, list(range(n)), steps, f"cbq/blocks_{w.start}-{w.stop - 1}")
        end_loss = mean_rec("hard")
        kept = s.keep_better and end_loss > start_loss
        if kept:  # the hardened result is worse than the window's start: keep the start
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
        entry = {"window": k, "start": w.start, "stop": w.stop, "rec_start": start_loss, "rec_final": end_loss,
                 "kept_start": kept}
        report.append(entry)
        log({f"cbq/blocks_{w.start}-{w.stop - 1}/rec_start": start_loss,
             f"cbq/blocks_{w.start}-{w.stop - 1}/rec_final": end_loss,
             f"cbq/blocks_{w.start}-{w.stop - 1}/kept_start": float(kept)})
        last = k == len(schedule) - 1
        for b in w.finalize:
            if not last:
                _set_mode(ses.window_layers(Window(b, b + 1, ())), "fp")
                x_fp = ses.advance(b, b + 1, x_fp, rests)
            ses.harden(b)
            if not last:
                x_q = ses.advance(b, b + 1, x_q, rests)
        _set_mode(ses.window_layers(w), "soft")
        if on_window is not None:
            on_window(ses.snapshot(k + 1, report))
    return ses.entries


def _param_groups(layers: list[CBQLinear], rounding_lr: float | None) -> list[dict]:
    """The step sizes, then the rounding parameters (at ``rounding_lr`` when given), as optimiser groups."""
    steps = [p for layer in layers for n, p in layer.named_parameters() if p.requires_grad and
             not n.startswith("rounding.")]
    rounding = [p for layer in layers for p in layer.rounding.parameters() if p.requires_grad]
    extra = {} if rounding_lr is None else {"lr": rounding_lr}
    return [group for group in ({"params": steps}, {"params": rounding, **extra}) if group["params"]]


def _observe_act_ranges(ses: _Session, w: Window, new: list[CBQLinear], x_q, rests) -> None:
    """Static activation steps of the newly wrapped layers from their input ranges on the quantized path."""
    layers = ses.window_layers(w)
    _set_mode(layers, "soft")
    for layer in new:
        layer.act_range = [math.inf, -math.inf]
    with torch.no_grad():
        for x, r in zip(x_q, rests):
            ses.run(w.start, w.stop, x, r)
    for layer in new:
        lo, hi = layer.act_range
        layer.act_range = None
        layer.set_act_range(lo, hi)
