"""The ``lpvit`` plugin: LPViT's block masks chosen in the ``calibrate`` stage, kept fixed through a ``fit`` stage,
reported by ``evaluate`` and exported dense with zeros.

``calibrate`` accumulates the label-free gradient statistic over ``calibration`` samples (resumable per batch),
builds each layer's curves, allocates the amounts by equal slopes to the FLOPs budget and attaches the masks as
``weight_mask`` buffers (``trainer/compression/fixed_masks.py``), which a following fit cannot revive. ``resume=auto``
restores the finished masks from the run dir (a fit checkpoint carries them too). No torch import at module level.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

from blocktrain.trainer.compression.config import CalibrationConfig, LmEvalConfig
from blocktrain.trainer.compression.pruning import PruningPlugin
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext

_WHERE = "plugin.lpvit"


@dataclass
class LPViTConfig(PluginConfig):
    """``plugin.lpvit``: defaults are the official scripts' DeiT settings (32x32 blocks, 50% FLOPs, power term, second
    order, smoothed curves)."""

    flops: float = 0.5  # fraction of the pruned layers' FLOPs kept, in (0, 1] (the code's --amount with --flop_budget)
    block: List[int] = field(default_factory=lambda: [32, 32])  # R x C; rows = output features
    exclude: List[str] = field(default_factory=lambda: ["lm_head"])  # layer names (last part) left dense
    ceil_mode: bool = True  # edge blocks that overhang a layer are scored on their valid part (as coded); false: error
    ranking: str = "taylor"  # taylor: |W * g| | l1: |W|
    second_order: bool = True  # add the empirical-Fisher term 1/2 dw^T (g g^T + damp I) dw
    damp: float = 1.0e-7
    smooth: Optional[float] = 0.5  # de-biased EMA weight on the distortion curves; null = none
    power: bool = True  # add beta * power curve with automatic beta (the code's --lambda_power 1)
    h: int = 4  # stencil step of the allocation's derivatives
    min_density: float = 0.05  # each layer keeps >= min(min_density, (1 - flops)/2) of its blocks (the code's min_sp)
    grid: int = 100  # amounts 0, 1/grid, ..., 1
    tolerance: float = 0.02  # the bisection stops within this of the budget
    max_iters: int = 40
    faithful: bool = True  # the code's + beta*P, incremental 2nd-order update, inexact odd-step stencil; false: fixed
    normalize: bool = True  # bisect on slopes in units of the median layer's largest derivative; false: as coded
    select: str = "slope"  # slope: argmin |C'(a) - slope| (as coded) | lagrangian: argmin C(a) - slope * a
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(samples=2000, batch_size=64))
    save_every_s: float = 300.0  # resumable state written at most this often (and on Ctrl-C, and at the end)
    export_block_sparse: bool = False  # export also a model whose pruned Linears run block_sparse_linear
    finetune_block_sparse: bool = False  # fit stages run the masked Linears with block_sparse_linear (same result)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def __post_init__(self):
        if not 0.0 < self.flops <= 1.0:
            raise UserError(f"{_WHERE}.flops must be in (0, 1] (the fraction of the pruned layers' FLOPs kept), "
                            f"got {self.flops}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise UserError(f"{_WHERE}.block must be two positive sizes [rows, cols], got {list(self.block)}")
        if self.ranking not in ("taylor", "l1"):
            raise UserError(f"{_WHERE}.ranking must be taylor or l1, got {self.ranking!r}")
        if self.select not in ("slope", "lagrangian"):
            raise UserError(f"{_WHERE}.select must be slope or lagrangian, got {self.select!r}")
        if self.smooth is not None and not 0.0 <= self.smooth < 1.0:
            raise UserError(f"{_WHERE}.smooth must be in [0, 1) or null, got {self.smooth}")
        if not 0.0 <= self.min_density < 1.0:
            raise UserError(f"{_WHERE}.min_density must be in [0, 1), got {self.min_density}")
        if self.h < 1 or self.grid < 4 or self.max_iters < 1 or self.tolerance <= 0 or self.damp < 0:
            raise UserError(f"{_WHERE}: h >= 1, grid >= 4, max_iters >= 1, tolerance > 0 and damp >= 0 are needed, got "
                            f"h={self.h}, grid={self.grid}, max_iters={self.max_iters}, tolerance={self.tolerance}, "
                            f"damp={self.damp}")
        self.calibration.check(f"{_WHERE}.calibration")


class LPViTPlugin(PruningPlugin):
    """LPViT: block masks on every Linear and Conv2d, allocated by equal rate–distortion(+power) slopes to a FLOPs
    budget; masks fixed through fine-tuning."""

    name = "lpvit"
    description = "LPViT block pruning: power-aware equal-slope allocation to a FLOPs budget, masks fixed for fine-tuning"
    config_class = LPViTConfig

    def __init__(self, config):
        super().__init__(config)
        self.info: dict = {}  # amounts, positions, FLOPs kept, beta, slope (after calibrate)
        self._parked: dict = {}  # masks detached for an export stage

    def settings(self):
        from blocktrain.plugins.lpvit.pruner import LPViTSettings

        c = self.config
        keys = {f.name for f in dataclasses.fields(LPViTSettings)} - {"block"}
        return LPViTSettings(block=(int(c.block[0]), int(c.block[1])), **{k: getattr(c, k) for k in keys})

    def apply(self, model, run):
        from blocktrain.plugins.lpvit.pruner import check_targets
        from blocktrain.trainer.compression.fixed_masks import find_weight_layers

        c = self.config
        self.names = find_weight_layers(model, exclude=tuple(c.exclude))
        if not self.names:
            raise UserError(f"plugin lpvit: the model has no nn.Linear or nn.Conv2d layers to prune outside "
                            f"{_WHERE}.exclude={list(c.exclude)}")
        problems = check_targets(model, self.names, tuple(c.block), c.ceil_mode, _WHERE)
        if problems:
            more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
            raise UserError(f"plugin lpvit: {problems[0]}{more}")
        if c.lm_eval.tasks:
            from blocktrain.trainer.compression.evaluation import require_lm_eval

            require_lm_eval(f"{_WHERE}.lm_eval")
        return model

    def prune(self, model, run):
        from blocktrain.trainer.compression.calibration import calibration_batches
        from blocktrain.trainer.compression.fixed_masks import attach_masks
        from blocktrain.trainer.compression.state import ResumableState

        c = self.config
        state = ResumableState(run, self.name, dataclasses.asdict(c), c.save_every_s,
                               free=("save_every_s", "lm_eval", "export_block_sparse", "finetune_block_sparse"))
        saved = state.load() or {}
        if "masks" not in saved:
            cal = c.calibration
            batches = calibration_batches(run.data, cal.samples, cal.batch_size, self.seed(cal, run), run.device,
                                          where=f"{_WHERE}.calibration")
            saved = self._masks(model, batches, state, saved, run)
            state.save(saved)
        self.info = {k: v for k, v in saved.items() if k != "masks"}
        attach_masks(model, saved["masks"])
        run.log({"lpvit/flops_kept_planned": self.info["flops"], "lpvit/beta": self.info["beta"],
                 "lpvit/slope_log2": self.info["slope_log2"]})
        self._log_allocation(saved["masks"], run)

    def _log_allocation(self, masks: dict, run) -> None:
        """The allocation as media: a table (layer, amount pruned, density, share of the dense FLOPs kept) and the
        curves of four layers spread over the model with their chosen amounts."""
        from blocktrain.plugins.lpvit.figures import curves_picture
        from blocktrain.trainer.media import Table

        info = self.info
        dense = sum(masks[n].numel() * pos + bias for n, (pos, bias) in info["positions"].items())
        rows = [[n, round(a, 4), round(float(masks[n].float().mean()), 4),
                 round((int(masks[n].sum()) * info["positions"][n][0] + info["positions"][n][1]) / dense, 6)]
                for n, a in info["amounts"].items()]
        sign = 1.0 if self.config.faithful else -1.0
        run.log_media({"lpvit/allocation": Table(["layer", "amount", "density", "flops_kept_share"], rows),
                       "lpvit/curves": curves_picture(info["curves"], info["amounts"], info["beta"], sign)})

    def _masks(self, model, batches, state, saved, run) -> dict:
        """The gradient pass (one resumable step per batch), then curves, allocation and masks."""
        import sys

        from blocktrain.plugins.lpvit.pruner import gradient_statistic, masks_from_gradients

        s = self.settings()
        progress = {"sums": saved.get("sums", {}), "shapes": saved.get("shapes", {}), "batches": saved.get("batches", 0)}
        start = progress["batches"]
        with state.steps(len(batches) - start, f"lpvit: gradients over {len(batches)} batches",
                         lambda: dict(progress)) as step_done:

            def on_batch(i: int) -> None:
                progress["batches"] = i + 1
                step_done()

            gradient_statistic(model, self.names, batches, sums=progress["sums"], shapes=progress["shapes"],
                               on_batch=on_batch, start=start)
        grads = {n: progress["sums"][n] / len(batches) for n in self.names
                 if n in progress["sums"] and n in progress["shapes"]}
        skipped = [n for n in self.names if n not in grads]
        if skipped:
            print(f"lpvit: {len(skipped)} layers not reached by the forward stay dense: {', '.join(skipped)}",
                  file=sys.stderr)
        masks, info = masks_from_gradients(model, grads, progress["shapes"], s)
        if abs(info["flops"] - s.flops) > s.tolerance:
            print(f"lpvit: the allocation keeps {info['flops']:.3f} of the FLOPs, not {_WHERE}.flops={s.flops} (within "
                  f"{s.tolerance}): the budget is out of reach of the curves and the min_density cap", file=sys.stderr)
        from blocktrain.plugins.lpvit.figures import spread

        keep = ("amounts", "flops", "beta", "slope_log2", "positions")
        curves = {n: {k: info[k][n] for k in ("distortion", "power", "total")} for n in spread(list(info["total"]), 4)}
        return {"masks": masks, **{k: info[k] for k in keep}, "curves": curves}

    def callbacks(self, run):
        from blocktrain.plugins.lpvit.finetune import FixedMaskCallback

        return [FixedMaskCallback(tuple(self.config.block) if self.config.finetune_block_sparse else None)]

    def on_stage_start(self, stage, model, run):
        from blocktrain.trainer.compression.fixed_masks import attach_masks, detach_masks

        if stage.kind == "export":  # the engine saves a plain dense model with zeros (no mask buffers)
            self._parked = detach_masks(model)
        elif self._parked:
            attach_masks(model, self._parked)
            self._parked = {}

    def export(self, model, out_dir, run):
        """With ``export_block_sparse``: the dense model with zeros (``model/``, as the engine's export) and the
        block-sparse one (``block_sparse/``: the pruned Linears that the block tiles as BSR layers; reload with
        ``trainer.compression.block_sparse.load_block_sparse`` onto a fresh model). Otherwise the engine's export."""
        if not self.config.export_block_sparse:
            return []
        import copy

        from torch import nn

        from blocktrain.trainer.compression.block_sparse import save_block_sparse, to_block_sparse
        from blocktrain.trainer.run import save_model

        r, c = self.config.block
        written = [save_model(model, out_dir / "model", run.tokenizer)]
        sparse = copy.deepcopy(model)
        names = [n for n in self.info.get("amounts", {}) if isinstance(sparse.get_submodule(n), nn.Linear)
                 and sparse.get_submodule(n).out_features % r == 0 and sparse.get_submodule(n).in_features % c == 0]
        manifest = to_block_sparse(sparse, (r, c), names)
        written.append(save_block_sparse(sparse, manifest, out_dir / "block_sparse"))
        return written

    def evaluate(self, model, run):
        from blocktrain.plugins.lpvit.figures import mask_picture
        from blocktrain.plugins.lpvit.finetune import flops_kept
        from blocktrain.trainer.compression.report import report_sparsity

        metrics = report_sparsity(model, self.names, run)
        if self.info:
            metrics["lpvit/flops_kept"] = flops_kept(model, self.info["positions"])
            run.log_media({"lpvit/block_masks": mask_picture(model, self.names, tuple(self.config.block))})
        lm = self.config.lm_eval
        if lm.tasks:
            from blocktrain.trainer.compression.evaluation import lm_eval_scores

            metrics.update(lm_eval_scores(model, run.tokenizer, list(lm.tasks), lm.num_fewshot, lm.batch_size, lm.limit,
                                          lm.include_path))
        return metrics
