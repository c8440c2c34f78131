"""iCBS (Rosenberg et al. 2024): iterative Combinatorial Brain Surgeon by block coordinate descent.

Pure mask selection: kept weights always equal their originals w0, and each layer's pruned count never
changes after the initial mask. Each step takes one batch and one layer, picks a block of candidate
weights by gradient score |w0⊙g|, builds the block's QUBO from the empirical-Fisher Hessian of
per-sample gradients, solves it under Σx = k by simulated annealing, and applies the move.

Driving it (what a calibrate loop does)::

    pruner = ICBSPruner(model, causal_lm_sample_losses, config=ICBSConfig(density=0.5))
    pruner.initialize(calib_batches)            # or pruner.load_state_dict(saved) to resume
    while pruner.epoch < epochs or pruner.remaining:
        for _ in pruner.plan_epoch():           # the steps left in the current epoch
            pruner.step(next_batch())

Build the pruner on the model's original weights: they are captured as w0 (on the CPU), and
``load_state_dict`` re-applies the saved masks to them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from blocktrain.kernels.qubo_anneal import qubo_anneal
from blocktrain.trainer.compression.replay import default_forward
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.scores import input_square_sums, magnitude_scores, wanda_scores

from .persample import capture_io_grads, mean_weight_grad, per_sample_block_grads
from .qubo import block_qubo, move_delta, scale_and_cutoff
from .selection import allocate_steps, select_block
from .state import LayerState, TabuList, init_layer_state

__all__ = ["ICBSConfig", "ICBSPruner", "icbs_prune"]

INIT_METHODS = ("wanda_per_output", "wanda", "magnitude_per_output", "magnitude")
MAX_BLOCK = 8192


@dataclass
class ICBSConfig:
    """iCBS knobs; defaults are the paper's Mistral-7B settings (spec §5), density aside."""

    density: float = 0.5
    block_size: int = 4096
    k: int | None = None  # currently-pruned candidates per block; None = block_size // 2
    init: str = "wanda_per_output"
    grad_multiplier: float = 0.75
    ridge_multiplier: float = 1e-3
    tabu_frac: float = 0.4
    fix_frac_prune: float = 0.42
    fix_frac_keep: float = 0.35
    steps_per_epoch: int = 300
    min_steps: int = 10
    restarts: int = 20
    micro_batch: int | None = 4  # samples per forward/backward of a step's per-sample gradients (the paper's code: 1)
    beta0: float = 1e-3
    beta1: float = 100.0
    beta_factor: float = 1.1
    sweeps: int = 1
    faithful: bool = True  # the official Q[Q <= cutoff] = 0 and exp(-2β·ΔE) acceptance (else |Q| <= cutoff, exp(-β·ΔE))
    cutoff: float = 1e-12
    seed: int = 0
    backend: str | None = None  # annealer path: None (the kernels dispatch), "auto", "reference", "triton"

    @property
    def block_k(self) -> int:
        """Currently-pruned candidates per block."""
        return self.block_size // 2 if self.k is None else self.k

    @property
    def beta_scale(self) -> float:
        """The annealer's acceptance exp(−s·β·ΔE): s = 2 under ``faithful`` (``sa-card`` anneals an Ising energy
        twice the QUBO's), else 1 (β acts on the QUBO energy itself)."""
        return 2.0 if self.faithful else 1.0

    def __post_init__(self):
        if not 0.0 < self.density < 1.0:
            raise ValueError(f"density must be in (0, 1), got {self.density}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {self.init!r}")
        if not 1 <= self.block_size <= MAX_BLOCK:
            raise ValueError(f"block_size must be in [1, {MAX_BLOCK}], got {self.block_size}")
        if not 0 <= self.block_k <= self.block_size:
            raise ValueError(f"k must be in [0, block_size], got {self.k}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or None, got {self.micro_batch}")
        for name in ("tabu_frac", "fix_frac_prune", "fix_frac_keep"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def _checksum(w: torch.Tensor) -> tuple[float, float]:
    w = w.double()
    return float(w.sum()), float((w * w).sum())


class ICBSPruner:
    """The iCBS state machine over the named Linear weights of ``model`` (default: all but ``lm_head``).

    ``loss_fn(model, batch)`` returns one loss per sample (shape [N]), e.g. ``causal_lm_sample_losses``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 names: list[str] | None = None, config: ICBSConfig | None = None, **overrides):
        self.config = replace(config or ICBSConfig(), **overrides)
        self.model = model
        self.loss_fn = loss_fn
        self.names = find_linear_names(model) if names is None else list(names)
        self.w0 = {n: model.get_submodule(n).weight.detach().to("cpu", copy=True) for n in self.names}
        self.layers: dict[str, LayerState] = {}
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.dL_track: list[float] = []
        self.layer_steps = {n: 0 for n in self.names}  # steps done on each layer (the realised allocation)
        self.epoch = 0
        self.steps_done = 0
        self._plan: list[str] = []
        self._pos = 0

    # -- initial mask -----------------------------------------------------------------------------
    def initialize(self, calib_batches: Iterable | None = None, forward: Callable = default_forward) -> None:
        """Compute the initial masks (Wanda or magnitude scores of w0) and apply them."""
        cfg = self.config
        per_row = cfg.init.endswith("_per_output")
        if cfg.init.startswith("wanda"):
            if calib_batches is None:
                raise ValueError(f"init={cfg.init!r} needs calibration batches")
            sums = input_square_sums(self.model, self.names, calib_batches, forward)
        for name in self.names:
            w0 = self.w0[name]
            scores = wanda_scores(w0, sums[name]) if cfg.init.startswith("wanda") else magnitude_scores(w0)
            self.layers[name] = init_layer_state(scores, cfg.density, per_row, cfg.fix_frac_prune,
                                                 cfg.fix_frac_keep, cfg.block_size, cfg.tabu_frac)
            self._write(name)

    @torch.no_grad()
    def _write(self, name: str, idx: torch.Tensor | None = None) -> None:
        """Set the layer's weights (all, or at flat ``idx``) to w0 where kept and 0 where pruned."""
        weight = self.model.get_submodule(name).weight
        w0, pruned = self.w0[name].view(-1), self.layers[name].pruned
        if idx is None:
            weight.copy_(torch.where(pruned, 0, w0).view_as(weight))
        else:
            flat = weight.data.view(-1)
            flat[idx.to(flat.device)] = torch.where(pruned[idx], 0, w0[idx]).to(flat.device)

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        """Steps left in the current epoch's plan."""
        return len(self._plan) - self._pos

    def plan_epoch(self) -> list[str]:
        """The layer names of the steps left in this epoch; plans the next epoch when this one is done."""
        if not self.remaining:
            numels = {n: self.w0[n].numel() for n in self.names}
            self._plan = allocate_steps(numels, self.config.steps_per_epoch, self.config.min_steps, self.generator)
            self._pos = 0
            self.epoch += 1
        return self._plan[self._pos:]

    # -- one step ---------------------------------------------------------------------------------
    def step(self, batch: Any) -> float:
        """Run the next planned step on ``batch``; returns its estimated loss change dL (also in ``dL_track``)."""
        if not self.layers:
            raise RuntimeError("call initialize() or load_state_dict() before step()")
        if not self.remaining:
            self.plan_epoch()
        name = self._plan[self._pos]
        dL = self._step_layer(name, batch)
        self._pos += 1
        self.steps_done += 1
        self.layer_steps[name] += 1
        self.dL_track.append(dL)
        return dL

    def _step_layer(self, name: str, batch: Any) -> float:
        cfg = self.config
        module = self.model.get_submodule(name)
        state = self.layers[name]
        x, delta = capture_io_grads(self.model, module, self.loss_fn, batch, cfg.micro_batch)
        w0 = self.w0[name]
        scores = (w0.float() * mean_weight_grad(x, delta).cpu()).abs().flatten()
        idx, k = select_block(scores, state.pruned, state.frozen, None if state.tabu is None else state.tabu.mask(),
                              cfg.block_size, cfg.block_k)
        seed = int(torch.randint(2 ** 62, (1,), generator=self.generator))
        dev = x.device
        idx_dev = idx.to(dev)
        G = per_sample_block_grads(x, delta, idx_dev // w0.shape[1], idx_dev % w0.shape[1])
        H = G.T @ G / G.shape[0]
        w0b = w0.view(-1)[idx].to(dev, torch.float32)
        dw = module.weight.detach().view(-1)[idx_dev].float() - w0b
        Q, const = block_qubo(w0b, dw, G.mean(0), H, cfg.grad_multiplier, cfg.ridge_multiplier)
        Qs, scaling = scale_and_cutoff(Q, cfg.faithful, cfg.cutoff)
        xb = torch.arange(idx.numel(), device=dev) < k
        energy = 0.0
        if scaling is not None:
            xb, e = qubo_anneal(Qs, k, x0=xb, restarts=cfg.restarts, seed=seed, beta0=cfg.beta0, beta1=cfg.beta1,
                                beta_factor=cfg.beta_factor, beta_scale=cfg.beta_scale, sweeps=cfg.sweeps,
                                backend=cfg.backend)
            energy = e / scaling
        ridge = cfg.ridge_multiplier * float(move_delta(xb, w0b, dw).pow(2).sum())
        if state.tabu is not None:
            state.tabu.extend(idx)
        state.pruned[idx] = xb.cpu()
        self._write(name, idx)
        return const + energy - ridge

    # -- driving loops ----------------------------------------------------------------------------
    def run(self, batches: Iterable, epochs: int, on_step: Callable[["ICBSPruner", float], None] | None = None) -> None:
        """Step until ``epochs`` epochs are done (continuing a resumed epoch first).

        A sequence of batches is indexed by ``steps_done`` (so a resumed run sees the same batches);
        another iterable is cycled from its start.
        """
        stream = None if isinstance(batches, Sequence) else _cycle(batches)
        while self.epoch < epochs or self.remaining:
            for _ in self.plan_epoch():
                batch = batches[self.steps_done % len(batches)] if stream is None else next(stream)
                dL = self.step(batch)
                if on_step is not None:
                    on_step(self, dL)

    # -- results and resume -----------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks (True = kept), shaped like the weights, on the CPU."""
        return {n: ~s.pruned.view(self.w0[n].shape) for n, s in self.layers.items()}

    def state_dict(self) -> dict:
        """Everything needed to continue identically: masks, frozen sets, tabu lists, plan, counters (total and per
        layer), RNG, dL."""
        return {
            "names": list(self.names),
            "w0_checksums": {n: _checksum(self.w0[n]) for n in self.names},
            "layers": {n: {"pruned": s.pruned.clone(), "frozen": s.frozen.clone(),
                           "tabu": None if s.tabu is None else s.tabu.state_dict()} for n, s in self.layers.items()},
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "layer_steps": dict(self.layer_steps),
            "plan": list(self._plan),
            "plan_pos": self._pos,
            "generator": self.generator.get_state(),
            "dL_track": list(self.dL_track),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output and re-apply its masks to the original weights."""
        if state["names"] != self.names:
            raise ValueError("the saved iCBS state covers different layers")
        for n in self.names:
            saved, current = state["w0_checksums"][n], _checksum(self.w0[n])
            if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, current)):
                raise ValueError(f"layer {n}: the pruner must be built on the model's original (unpruned) weights")
        self.layers = {}
        for n, s in state["layers"].items():
            tabu = None
            if s["tabu"] is not None:
                tabu = TabuList(self.w0[n].numel(), s["tabu"]["maxlen"])
                tabu.load_state_dict(s["tabu"])
            self.layers[n] = LayerState(s["pruned"].clone(), s["frozen"].clone(), tabu)
            self._write(n)
        self.epoch = int(state["epoch"])
        self.steps_done = int(state["steps_done"])
        self.layer_steps = {n: int(state["layer_steps"][n]) for n in self.names}
        self._plan = list(state["plan"])
        self._pos = int(state["plan_pos"])
        self.generator.set_state(state["generator"])
        self.dL_track = list(state["dL_track"])


def _cycle(batches: Iterable) -> Iterator:
    while True:
        seen = 0
        for batch in batches:
            seen += 1
            yield batch
        if not seen:
            raise ValueError("no pruning batches")


def icbs_prune(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
               density: float = 0.5, *, epochs: int = 1, names: list[str] | None = None,
               calib_batches: Iterable | None = None, forward: Callable = default_forward,
               on_step: Callable[[ICBSPruner, float], None] | None = None, **config) -> ICBSPruner:
    """Prune ``model`` in place with iCBS: initial mask from ``calib_batches`` (default: ``batches``), then
    ``epochs`` × ``steps_per_epoch`` steps over ``batches``. Returns the pruner (masks, dL_track, state)."""
    model.eval()
    pruner = ICBSPruner(model, loss_fn, names, ICBSConfig(density=density, **config))
    pruner.initialize(batches if calib_batches is None else calib_batches, forward)
    pruner.run(batches, epochs, on_step)
    return pruner
