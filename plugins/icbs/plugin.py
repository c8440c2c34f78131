"""The ``icbs`` plugin: the iCBS core bound to a run, as a long, resumable calibrate stage.

The initial mask comes from ``calibration`` samples (Wanda scores of the original weights); then
``epochs`` × ``steps_per_epoch`` steps, each on one batch of ``pruning`` samples, one layer and one block
of ``block_size`` weights. Every step's estimated loss change is logged as ``icbs/dL``, and at the end the
steps each layer got as ``icbs/steps/<layer>``. The pruner's full state (masks, tabu lists, plan, RNG) is
saved under the run dir, so ``resume=auto`` continues an interrupted run, and a finished one resumed with
more ``epochs`` goes on. No torch import at module level.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from blocktrain.trainer.compression.pruning import PruningPlugin, SparsityConfig
from blocktrain.trainer.compression.config import CalibrationConfig, check_density
from blocktrain.trainer.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from blocktrain.trainer.context import RunContext



@dataclass
class ICBSPluginConfig(SparsityConfig):
    """``plugin.icbs``: defaults are the paper's Mistral-7B settings (density aside; see the README)."""

    epochs: int = 1  # the quality-time knob, with steps_per_epoch; 0 = the initial (Wanda) mask alone
    steps_per_epoch: int = 300
    block_size: int = 4096  # weights per QUBO (b <= 8192)
    k: Optional[int] = None  # currently-pruned candidates per block; null = block_size // 2
    init: str = "wanda_per_output"  # wanda_per_output | wanda | magnitude_per_output | magnitude
    grad_multiplier: float = 0.75
    ridge_multiplier: float = 0.001
    tabu_frac: float = 0.4
    fix_frac_prune: float = 0.42
    fix_frac_keep: float = 0.35
    min_steps: int = 10  # per layer and epoch (violated, with a warning, when layers x min_steps > steps_per_epoch)
    restarts: int = 20  # annealing chains per QUBO
    micro_batch: Optional[int] = 4  # samples per forward/backward for the per-sample gradients (memory); null = all
    beta0: float = 0.001
    beta1: float = 100.0
    beta_factor: float = 1.1
    sweeps: int = 1  # per temperature
    faithful: bool = True  # official Q[Q <= cutoff] = 0 and exp(-2β·ΔE) acceptance; false: |Q| <= cutoff, exp(-β·ΔE)
    cutoff: float = 1e-12
    seed: Optional[int] = None  # the pruner's RNG (plan, annealing); null = the run's seed
    backend: Optional[str] = None  # annealer: null (kernel dispatch) | auto | reference | triton
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # the initial mask's samples
    pruning: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=256, batch_size=16))
    save_every_s: float = 300.0  # resumable state written at most this often (and on Ctrl-C, and at the end)

    def __post_init__(self):
        check_density(self.density, "plugin.icbs")
        if self.epochs < 0 or self.steps_per_epoch < 1:
            raise UserError(f"plugin.icbs.epochs must be >= 0 and plugin.icbs.steps_per_epoch >= 1, got "
                            f"{self.epochs}, {self.steps_per_epoch}")
        self.calibration.check("plugin.icbs.calibration")
        self.pruning.check("plugin.icbs.pruning")


class ICBSPlugin(PruningPlugin):
    """iCBS pruning: per-layer masks chosen by block coordinate descent over cardinality-constrained QUBOs."""

    name = "icbs"
    description = "iCBS pruning: Wanda init, then block coordinate descent over QUBOs (long, resumable calibrate)"
    config_class = ICBSPluginConfig

    def core_config(self, run: "RunContext"):
        """The core's ``ICBSConfig`` (its checks, as a ``UserError``)."""
        from blocktrain.plugins.icbs.pruner import ICBSConfig

        c = self.config
        values = {f.name: getattr(c, f.name) for f in dataclasses.fields(ICBSConfig) if f.name != "seed"}
        try:
            return ICBSConfig(**values, seed=int(run.cfg.seed if c.seed is None else c.seed))
        except ValueError as e:
            raise UserError(f"plugin.icbs: {e}") from None

    def loss_fn(self, run: "RunContext"):
        """The run's task's per-sample loss (``Task.per_sample_loss``: e.g. next-token CE of a causal LM)."""
        task = run.task
        if task is None or not task.has_per_sample_loss:
            kind = run.cfg.task.kind if run.cfg.get("task") is not None else None
            raise UserError(f"plugin icbs needs a per-sample loss, and task {kind} has none: use a task that "
                            "defines one (causal_lm, image_classification, sequence_classification)")
        return task.per_sample_loss

    def apply(self, model, run):
        model = super().apply(model, run)
        self.loss_fn(run)
        self.core_config(run)
        return model

    def prune(self, model, run):
        from blocktrain.plugins.icbs.pruner import ICBSPruner
        from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
        from blocktrain.trainer.compression.state import ResumableState

        c = self.config
        pruner = ICBSPruner(model, self.loss_fn(run), self.names, self.core_config(run))
        state = ResumableState(run, self.name, dataclasses.asdict(c), c.save_every_s,
                               free=("epochs", "save_every_s", "lm_eval"))
        saved = state.load()
        if saved is not None:
            pruner.load_state_dict(saved)
        else:
            cal = c.calibration
            pruner.initialize(calibration_batches(run.data, cal.samples, cal.batch_size, self.seed(cal, run), run.device,
                                                  where="plugin.icbs.calibration"), calibration_forward)
        total = pruner.remaining + max(0, c.epochs - pruner.epoch) * c.steps_per_epoch
        batches = calibration_batches(run.data, c.pruning.samples, c.pruning.batch_size, self.seed(c.pruning, run),
                                      run.device, where="plugin.icbs.pruning") if total else []
        cumulative = sum(pruner.dL_track)
        start = time.perf_counter()
        with state.steps(total, f"iCBS: {total} steps", pruner.state_dict) as step_done:

            def on_step(p, dL: float) -> None:
                nonlocal cumulative
                cumulative += dL
                run.log({"icbs/dL": dL, "icbs/dL_cumulative": cumulative, "icbs/epoch": p.epoch}, step=p.steps_done)
                step_done()

            pruner.run(batches, c.epochs, on_step)
        state.save(pruner.state_dict())
        summary = {"icbs/steps": pruner.steps_done, "icbs/epochs_done": pruner.epoch,
                   **{f"icbs/steps/{name}": n for name, n in pruner.layer_steps.items()}}
        if pruner.dL_track:
            summary.update({"icbs/dL_sum": sum(pruner.dL_track), "icbs/dL_mean": sum(pruner.dL_track) / pruner.steps_done})
        if total:
            summary["icbs/step_time_s"] = (time.perf_counter() - start) / total
        run.log(summary)
