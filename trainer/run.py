"""`run(cfg)`: assemble model, data, plugins and a Lightning Trainer, then run the recipe's stages."""
from __future__ import annotations

import inspect
import signal
import sys
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
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import atomic_path
from blocktrain.trainer.loggers import JsonMetricsLogger, build_loggers, finish_wandb
from blocktrain.trainer.module import RunModule
from blocktrain.trainer.registry import load_plugin_class
from blocktrain.trainer.resolvers import register_resolvers, set_data_info
from blocktrain.trainer.validation import STAGES, validate_config


class RunInterrupted(UserError):
    """Ctrl-C during a run: a checkpoint was written; ``resume=auto`` continues."""


def resolve_run_dir(cfg: DictConfig) -> Path:
    """Hydra's output dir when run by `train` (per job in a multirun), else ``cfg.run_dir``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.run_dir)


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` section as Lightning Trainer keywords; unknown keys list the valid ones."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks", "plugins"}
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
    if resume is None and (any(checkpoint_dir(run_dir).glob("*.ckpt")) or any((run_dir / "state").glob("*.pt"))):
        raise UserError(f"{run_dir} already holds checkpoints of an earlier run: pass resume=auto to continue it, "
                        "or choose another run_dir")


def run(cfg: DictConfig, extra_callbacks: list[pl.Callback] | None = None) -> float | None:
    """Run the recipe's stages; return the value of ``cfg.optimized_metric`` (for sweepers)."""
    plugins = build_plugins(cfg)
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
    with atomic_path(run_dir / "config.yaml") as tmp:  # resolved, now that the data info is known
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loaded = load_model(cfg.model, processor=processor)
    loggers = build_loggers(cfg, run_dir, OmegaConf.to_container(cfg, resolve=True))
    metrics = next(lg for lg in loggers if isinstance(lg, JsonMetricsLogger))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, metrics=None, tokenizer=loaded.tokenizer, data=datasets,
                     resuming=cfg.resume is not None)
    ctx.metrics = _ContextMetrics(loggers, ctx)

    model = loaded.model
    for plugin in plugins:
        model = plugin.apply(model, ctx) or model
    if cfg.init_from:
        load_weights(model, Path(cfg.init_from), plugins)
    if "fit" in cfg.stages:
        check_new_weights_trained(model, loaded.info.get("new_weights", ()), plugins, cfg.init_from)
    task = build_task(cfg.task, datasets.info if datasets else {}) if cfg.task is not None else None
    if task is not None:
        task.setup(model, ctx)

    module = RunModule(model, task, plugins, cfg.optim, cfg.scheduler, ctx)
    last_checkpoint = LastCheckpoint(checkpoint_dir(run_dir) / "last.ckpt")
    callbacks = [DataPositionCallback(), last_checkpoint, *_progress_callbacks(tkw.get("enable_progress_bar", True)),
                 *(extra_callbacks or []), *_task_and_plugin_callbacks(cfg, run_dir, task, plugins, ctx)]
    trainer = pl.Trainer(**tkw, logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                         default_root_dir=str(run_dir), use_distributed_sampler=False,
                         enable_checkpointing="fit" in cfg.stages)
    ctx.trainer, ctx.device = trainer, str(trainer.strategy.root_device)

    trainable, total = count_parameters(model)
    ctx.log({"params/trainable": trainable, "params/total": total}, step=0)

    sigint = signal.getsignal(signal.SIGINT)
    exit_code = 1
    try:
        _run_stages(cfg, trainer, module, _datamodule(cfg, datasets), plugins, model, ctx, run_dir)
        exit_code = 0
    except KeyboardInterrupt:
        metrics.set_status("interrupted")
        raise RunInterrupted(_interrupt_message(cfg, run_dir)) from None
    except BaseException as exc:
        interrupted = isinstance(exc, SystemExit) and last_checkpoint.saved_on_interrupt
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
                         cfg.seed)


def _task_and_plugin_callbacks(cfg: DictConfig, run_dir: Path, task, plugins, ctx: RunContext) -> list[pl.Callback]:
    """Run statistics and the task's and plugins' callbacks; periodic checkpoints when the run trains."""
    callbacks = [RunStats(task), *task.callbacks()] if task is not None else []
    for plugin in plugins:
        callbacks.extend(plugin.callbacks(ctx))
    if "fit" in cfg.stages:
        from pytorch_lightning.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir(run_dir), filename="step{step:07d}",
                                         auto_insert_metric_name=False, every_n_train_steps=cfg.checkpoint.every_n_steps,
                                         save_top_k=cfg.checkpoint.keep_last, monitor="step", mode="max",
                                         save_last=True, save_on_train_epoch_end=True))
    return callbacks


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


def _run_stages(cfg, trainer, module, datamodule, plugins, model, ctx, run_dir) -> None:
    stages = [s for s in STAGES if s in cfg.stages]
    for stage in stages:
        if stage == "fit":
            ckpt = resolve_resume(cfg.resume, run_dir)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=False)
        elif stage == "calibrate":
            model.eval()
            for plugin in plugins:
                plugin.calibrate(model, ctx)
        elif stage == "evaluate":
            model.eval()
            if module.task is not None and datamodule is not None and datamodule.datasets.val is not None:
                trainer.validate(module, datamodule=datamodule, verbose=False)
            for plugin in plugins:
                values = dict(plugin.evaluate(model, ctx))
                if values:
                    ctx.log(values)
        elif stage == "sample":
            for plugin in plugins:
                values = {k: v for k, v in plugin.sample(model, ctx).items() if isinstance(v, (int, float))}
                if values:
                    ctx.log(values)
        elif stage == "export":
            export_model(model, plugins, run_dir / "export", ctx)


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
