"""`run(cfg)`: assemble model, data, plugins and a Lightning Trainer, then run the recipe's stages."""
from __future__ import annotations

import inspect
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from blocktrain import kernels
from blocktrain.trainer.adapters import check_new_weights_trained
from blocktrain.trainer.callbacks import LastCheckpoint, DataPositionCallback, RunStats, count_parameters
from blocktrain.trainer.checkpoint import AtomicCheckpointIO, checkpoint_dir, load_weights, resolve_resume
from blocktrain.trainer.context import RunContext
from blocktrain.trainer.data_module import RunDataModule
from blocktrain.trainer.ema import EMA
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import atomic_path
from blocktrain.trainer.loggers import JsonMetricsLogger, build_loggers, finish_wandb
from blocktrain.trainer.module import RunModule
from blocktrain.trainer.registry import load_plugin_class
from blocktrain.trainer.resolvers import register_resolvers, set_data_info
from blocktrain.trainer.registry import STAGES
from blocktrain.trainer.stages import Stage, metric_prefix, parse_stages
from blocktrain.trainer.validation import check_local_paths, validate_config


class RunInterrupted(UserError):
    """Ctrl-C during a run: a checkpoint was written; ``resume=auto`` continues."""


def resolve_run_dir(cfg: DictConfig) -> Path:
    """Hydra's output dir when run by `train` (per job in a multirun), else ``cfg.run_dir``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.run_dir)


def trainer_kwargs(cfg: DictConfig, phase: Stage | None = None) -> dict[str, Any]:
    """The `trainer` section, with a fit phase's own keys on top, as Lightning Trainer keywords; unknown
    keys list the valid ones."""
    overrides = {k: v for k, v in phase.settings.items() if k not in ("optim", "scheduler")} if phase else {}
    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks", "plugins"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}' in stage {phase.name}: a fit phase takes name, optim, "
                        f"scheduler and Lightning Trainer keys: {', '.join(sorted(valid))}")
    kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), **overrides}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}' in trainer. Valid keys: {', '.join(sorted(valid))}")
    return kwargs


def _progress_callbacks(enabled: bool) -> list[pl.Callback]:
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

    if not enabled:
        return []
    return [RichProgressBar()] if sys.stderr.isatty() else [TQDMProgressBar(refresh_rate=50)]


def build_plugins(cfg: DictConfig) -> list:
    validated = validate_config(cfg)
    return [load_plugin_class(name)(OmegaConf.to_object(node)) for name, node in validated.items()]


def _check_fresh_run_dir(run_dir: Path, resume: str | None) -> None:
    if resume is None and (any(checkpoint_dir(run_dir).rglob("*.ckpt")) or any((run_dir / "state").glob("*.pt"))):
        raise UserError(f"{run_dir} already holds checkpoints of an earlier run: pass resume=auto to continue it, "
                        "or choose another run_dir")


def run(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> float | None:
    """Run the recipe's stages in order; return the value of ``cfg.optimized_metric`` (for sweepers)."""
    plugins = build_plugins(cfg)
    stages = parse_stages(cfg.stages)
    check_local_paths(cfg)  # before anything downloads or loads
    run_dir = resolve_run_dir(cfg).resolve()
    _check_fresh_run_dir(run_dir, cfg.resume)
    run_dir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    kernels.set_backend(None if cfg.kernel_backend == "auto" else cfg.kernel_backend)  # auto: $BLOCKTRAIN_KERNELS

    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import load_model, load_processor
    from blocktrain.trainer.tasks import build_task

    register_resolvers()
    processor = load_processor(cfg.model)
    datasets = build_datasets(cfg.data, tokenizer=processor, seed=cfg.seed) if cfg.data is not None else None
    set_data_info(datasets.info if datasets is not None else {})
    tkw = trainer_kwargs(cfg)  # after the data: trainer keys may read ${data_info:...} (e.g. few-shot steps)
    for stage in stages:  # a phase's trainer keys are checked before the model loads
        if stage.kind == "fit":
            trainer_kwargs(cfg, stage)
    with atomic_path(run_dir / "config.yaml") as tmp:  # resolved, now that the data info is known
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loaded = load_model(cfg.model, processor=processor)
    loggers = build_loggers(cfg, run_dir, OmegaConf.to_container(cfg, resolve=True))
    metrics = next(lg for lg in loggers if isinstance(lg, JsonMetricsLogger))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, metrics=None, tokenizer=loaded.tokenizer, data=datasets,
                     resuming=cfg.resume is not None)
    ctx.metrics = _ContextMetrics(loggers, ctx)

    task = ctx.task = build_task(cfg.task, datasets.info if datasets else {}) if cfg.task is not None else None
    model = loaded.model
    for plugin in plugins:
        model = plugin.apply(model, ctx) or model
    if cfg.init_from:
        load_weights(model, Path(cfg.init_from), plugins)
    if any(stage.kind == "fit" for stage in stages):
        check_new_weights_trained(model, loaded.info.get("new_weights", ()), plugins, cfg.init_from)
    if task is not None:
        task.setup(model, ctx)

    state = RunState(cfg, run_dir, model, task, plugins, ctx, loggers, _datamodule(cfg, datasets), tkw,
                     extra_callbacks or [], metrics)
    trainable, total = count_parameters(model)
    ctx.log({"params/trainable": trainable, "params/total": total}, step=0)

    sigint = signal.getsignal(signal.SIGINT)
    exit_code = 1
    try:
        state.run_stages(stages)
        exit_code = 0
    except KeyboardInterrupt:
        metrics.set_status("interrupted")
        raise RunInterrupted(_interrupt_message(cfg, run_dir)) from None
    except BaseException as exc:
        interrupted = isinstance(exc, SystemExit) and state.saved_on_interrupt
        metrics.set_status("interrupted" if interrupted else "failed")
        if interrupted:
            raise RunInterrupted(_interrupt_message(cfg, run_dir)) from None
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a Ctrl-C
        finish_wandb(loggers, exit_code)
    result = metrics.metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None
    metrics.set_status("finished", optimized_metric=cfg.optimized_metric, optimized_value=result)
    return result


def _datamodule(cfg: DictConfig, datasets) -> RunDataModule | None:
    if datasets is None:
        return None
    batch_size = datasets.info.get("batch_size", cfg.data.batch_size)  # a source may lower it (few-shot pools)
    return RunDataModule(datasets, batch_size, cfg.data.get("eval_batch_size"), cfg.data.get("num_workers", 0),
                         cfg.seed, cfg.data.get("repeats", 1))


def _interrupt_message(cfg: DictConfig, run_dir: Path) -> str:
    return (f"interrupted; the run can continue from its last checkpoint with:\n"
            f"  train recipe={cfg.name} run_dir={run_dir} resume=auto")


class _ContextMetrics:
    """RunContext.metrics for plugins: log to every logger from outside the fit loop."""

    def __init__(self, loggers: list, ctx: RunContext):
        self.loggers, self.ctx = loggers, ctx

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        if step is None:
            step = self.ctx.trainer.global_step if self.ctx.trainer is not None else 0
        for lg in self.loggers:
            lg.log_metrics({k: float(v) for k, v in values.items()}, step=step)


class RunState:
    """The assembled run the stages act on: model, task, plugins, data, loggers and Lightning trainers.

    Every fit phase gets its own Trainer (a fresh optimiser and scheduler from the run's presets merged
    with the phase's settings) and checkpoint folder; evaluation uses the latest trainer. metrics.json
    names the stage the run is in.
    """

    def __init__(self, cfg, run_dir: Path, model, task, plugins, ctx: RunContext, loggers, datamodule,
                 trainer_kw: dict, extra_callbacks: list, metrics: JsonMetricsLogger):
        self.cfg, self.run_dir, self.model, self.task, self.plugins, self.ctx = cfg, run_dir, model, task, plugins, ctx
        self.loggers, self.datamodule, self.trainer_kw, self.extra_callbacks = loggers, datamodule, trainer_kw, extra_callbacks
        self.metrics = metrics
        self.saved_on_interrupt = False
        self._callbacks = _task_and_plugin_callbacks(task, plugins, ctx)
        self.ema = EMA(model, cfg.ema.decay, cfg.ema.targets) if cfg.get("ema") and cfg.ema.decay else None
        self._first_fit: str | None = None
        self.trainer = self._trainer(self.trainer_kw)  # device, evaluation and calibration before any fit
        ctx.device = str(self.trainer.strategy.root_device)

    def run_stages(self, stages: list[Stage]) -> None:
        self._first_fit = next((s.name for s in stages if s.kind == "fit"), None)
        for stage in stages:
            self.ctx.stage = self.metrics.stage = stage
            for plugin in self.plugins:
                plugin.on_stage_start(stage, self.model, self.ctx)
            STAGES.load(stage.kind)(self, stage)
        self.ctx.stage = self.metrics.stage = None

    def _trainer(self, kwargs: dict, phase: Stage | None = None) -> pl.Trainer:
        """Callbacks in the order Lightning calls them: the step's own state (data position, EMA) first, so every
        later callback, an interrupt and each checkpoint see it complete; then the rest; checkpoints last."""
        callbacks = [*_progress_callbacks(kwargs.get("enable_progress_bar", True)), *self.extra_callbacks,
                     *self._callbacks]
        step_state = [self.ema] if self.ema is not None else []
        if phase is not None:
            from pytorch_lightning.callbacks import ModelCheckpoint

            folder = checkpoint_dir(self.run_dir, phase.name)
            self._last = LastCheckpoint(folder / "last.ckpt")
            step_state.insert(0, DataPositionCallback())
            callbacks = [self._last, *callbacks, ModelCheckpoint(
                dirpath=folder, filename="step{step:07d}", auto_insert_metric_name=False,
                every_n_train_steps=self.cfg.checkpoint.every_n_steps, save_top_k=self.cfg.checkpoint.keep_last,
                monitor="step", mode="max", save_last=True, save_on_train_epoch_end=True)]
        trainer = pl.Trainer(**kwargs, logger=self.loggers, callbacks=[*step_state, *callbacks], plugins=[AtomicCheckpointIO()],
                             default_root_dir=str(self.run_dir), use_distributed_sampler=False,
                             enable_checkpointing=phase is not None)
        self.ctx.trainer = trainer
        return trainer

    def fit(self, stage: Stage) -> None:
        """One fit phase; with ``resume`` it continues from its own checkpoint folder (a finished phase
        restores its final weights and returns). ``resume=PATH`` applies to the first phase."""
        optim = OmegaConf.merge(self.cfg.optim, stage.settings.get("optim") or {})
        scheduler = OmegaConf.merge(self.cfg.scheduler, stage.settings.get("scheduler") or {})
        module = RunModule(self.model, self.task, self.plugins, optim, scheduler, self.ctx, metric_prefix(stage))
        self.trainer = self._trainer(trainer_kwargs(self.cfg, stage), stage)
        resume = self.cfg.resume if self.cfg.resume in (None, "auto") or stage.name == self._first_fit else "auto"
        ckpt = resolve_resume(resume, self.run_dir, stage.name)
        if self.datamodule is not None:  # each phase counts its own position in the data (a resumed one restores it)
            self.datamodule.position = {"epoch": 0, "batches": 0}
        try:
            self.trainer.fit(module, datamodule=self.datamodule, ckpt_path=str(ckpt) if ckpt else None,
                             weights_only=False)
        finally:
            self.saved_on_interrupt = self._last.saved_on_interrupt

    def averaged(self):
        """The EMA weights in the model for evaluation, sampling and export (``ema.decay``), else as it is."""
        return self.ema.swapped() if self.ema is not None else nullcontext()

    def validate(self, stage: Stage) -> None:
        """The validate loop over the val split: the task's and plugins' metrics, reduced across processes."""
        if self.datamodule is None or self.datamodule.datasets.val is None:
            return
        module = RunModule(self.model, self.task, self.plugins, self.cfg.optim, self.cfg.scheduler, self.ctx)
        if module.has_eval_metrics():
            self.trainer.validate(module, datamodule=self.datamodule, verbose=False)


def _task_and_plugin_callbacks(task, plugins, ctx: RunContext) -> list[pl.Callback]:
    """Run statistics and the task's and plugins' callbacks."""
    callbacks = [RunStats(task), *task.callbacks()] if task is not None else []
    for plugin in plugins:
        callbacks.extend(plugin.callbacks(ctx))
    return callbacks


def export_model(model, plugins, out_dir: Path, ctx: RunContext) -> list[Path]:
    """Each plugin's export formats; without any, the whole model (save_pretrained or safetensors)."""
    written: list[Path] = []
    for plugin in plugins:
        written.extend(plugin.export(model, out_dir / plugin.name, ctx))
    if not written:
        written.append(save_model(model, out_dir / "model", ctx.tokenizer))
    return written


def save_model(model, out_dir: Path, tokenizer=None) -> Path:
    """`save_pretrained` (safetensors) for transformers models, else a safetensors state dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out_dir)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out_dir)
    else:
        from safetensors.torch import save_model as save_safetensors

        save_safetensors(model, str(out_dir / "model.safetensors"))
    return out_dir
