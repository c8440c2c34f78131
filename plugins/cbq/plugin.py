"""The ``cbq`` plugin: CBQ's core (``cbq.py``) bound to a run, on the quantization plugin base.

The calibrate stage runs CFP, then the sliding windows; each window's optimisation is the engine's ``learn``
loop (optimiser and scheduler from ``optim``/``scheduler`` and the calibrate stage's settings), logged as
``cbq/blocks_<a>-<b>/loss``, with the window's reconstruction loss at its hard-rounded start (round to nearest
at full rank) and after hard rounding (``.../rec_start``, ``.../rec_final``). After each window the state (hardened layers, the
learned quantizers of the block carried into the next window) is saved, so ``resume=auto`` continues from the
last finished window. The base logs the calibration time and peak memory, swaps in the ``QuantLinear``s and
reports bits per weight. No torch import at module level.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional

from blocktrain.plugins.cbq.settings import CFPSettings
from blocktrain.trainer.compression.quantizing import QuantConfig, QuantizationPlugin
from blocktrain.trainer.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from blocktrain.trainer.context import RunContext


@dataclass
class CBQConfig(QuantConfig):
    """``plugin.cbq``: the spec's readings by default (see plugins/cbq/README.md)."""

    section: ClassVar[str] = "plugin.cbq"

    window: int = 2  # blocks optimised jointly
    overlap: int = 1  # blocks shared by consecutive windows (window=1, overlap=0: block-wise, BRECQ-style)
    rank: int = 5  # LoRA-Rounding rank r of V = A1·A2; 0 = full AdaRound V
    init: str = "svd"  # svd (truncated SVD of AdaRound's V0) | zero (A1 = 0); with frozen_base both start at V0
    frozen_base: bool = True  # V = B + A1·A2 with B = V0 − A1·A2(init) frozen (start = RTN); false: V = A1·A2 alone
    keep_better: bool = True  # a window whose hardened loss ends above its start reverts to the start
    reg_weight: float = 0.01  # λ of the rounding regulariser Σ(1 − |2h − 1|^β)
    beta_start: float = 20.0  # β annealed linearly from beta_start to beta_end after the warm-up
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of a window's steps without the regulariser
    epochs: int = 10  # passes over the calibration batches per window (one optimiser step per batch)
    rounding_lr: Optional[float] = None  # lr of the rounding parameters (A1, A2 or V); null = optim.lr, like the step sizes
    kl_weight: float = 1.0  # E = squared L2 + kl_weight · KL(softmax ‖ softmax) over the hidden dimension
    two_branch: bool = True  # homologous loss: E(T_fp(X_fp), T_q(X_q)) + E(T_fp(X_q), T_q(X_q)); false: the first only
    cfp: CFPSettings = field(default_factory=CFPSettings)  # coarse-to-fine pre-processing
    storage: str = "cpu"  # where the cached block inputs and targets live: cpu (one batch on the device at a time) | device
    seed: int = 0  # A2's random init when init=zero

    def __post_init__(self):
        super().__post_init__()
        where = self.section
        if self.window < 1 or not 0 <= self.overlap < self.window:
            raise UserError(f"{where}.window must be >= 1 and {where}.overlap in [0, window), got "
                            f"{self.window}, {self.overlap}")
        if self.rank < 0:
            raise UserError(f"{where}.rank must be >= 0 (0 = full AdaRound V), got {self.rank}")
        if self.init not in ("svd", "zero"):
            raise UserError(f"{where}.init must be svd or zero, got {self.init!r}")
        if self.epochs < 0 or self.reg_weight < 0 or self.kl_weight < 0 or not 0 <= self.warmup < 1:
            raise UserError(f"{where}.epochs, reg_weight and kl_weight must be >= 0 and warmup in [0, 1), got "
                            f"{self.epochs}, {self.reg_weight}, {self.kl_weight}, {self.warmup}")
        if self.rounding_lr is not None and not self.rounding_lr > 0:
            raise UserError(f"{where}.rounding_lr must be > 0 or null (the optimiser's lr), got {self.rounding_lr}")
        if self.storage not in ("cpu", "device"):
            raise UserError(f"{where}.storage must be cpu or device, got {self.storage!r}")
        self.cfp.check(f"{where}.cfp")


class CBQPlugin(QuantizationPlugin):
    """CBQ: cross-block reconstruction over sliding windows with LoRA-Rounding, after CFP."""

    name = "cbq"
    description = "CBQ quantization: CFP, sliding-window cross-block reconstruction, LoRA-Rounding (W4A16 default)"
    config_class = CBQConfig

    @property
    def needs_data(self) -> bool:
        return True

    def settings(self):
        """The core's ``CBQSettings`` from the config."""
        from blocktrain.plugins.cbq.cbq import CBQSettings

        return CBQSettings(**{f.name: getattr(self.config, f.name) for f in dataclasses.fields(CBQSettings)})

    def apply(self, model, run):
        from blocktrain.plugins.cbq.cbq import find_blocks

        model = super().apply(model, run)
        try:
            find_blocks(model, self.names)
        except ValueError as e:
            raise UserError(f"plugin cbq: {e} (plugin.cbq.exclude)") from None
        return model

    def quantize_layers(self, model, run: "RunContext") -> dict[str, dict]:
        from functools import partial

        from blocktrain.plugins.cbq.cbq import cbq_quantize, find_blocks
        from blocktrain.plugins.cbq.windows import window_schedule
        from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
        from blocktrain.trainer.compression.learn import learn
        from blocktrain.trainer.compression.state import ResumableState

        c = self.config
        state = ResumableState(run, self.name, dataclasses.asdict(c), c.save_every_s, free=("save_every_s",))
        saved = state.load()
        cal = c.calibration
        seed = int(run.cfg.seed if cal.seed is None else cal.seed)
        batches = calibration_batches(run.data, cal.samples, cal.batch_size, seed, run.device,
                                      where=f"plugin.{self.name}.calibration")
        n_blocks = len(find_blocks(model, self.names)[1])
        remaining = len(window_schedule(n_blocks, c.window, c.overlap)) - (saved["next"] if saved else 0)
        latest = [saved]
        with state.steps(remaining, f"cbq: {remaining} windows", lambda: latest[0]) as step_done:

            def on_window(snapshot: dict) -> None:
                latest[0] = snapshot
                step_done()

            entries = cbq_quantize(model, batches, self.spec, self.act_spec, self.settings(), self.names,
                                   calibration_forward, learn=partial(learn, run), log=run.log, on_window=on_window,
                                   resume=saved, keep_zeros=self.keep_zeros,
                                   storage="cpu" if c.storage == "cpu" else run.device)
        state.save(latest[0])
        return entries
