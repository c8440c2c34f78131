"""Stages: the recipe's ordered ``stages`` list, each item a kind with optional settings.

``stages: [calibrate, {fit: {name: finetune, max_steps: 2000, optim: {lr: 1e-4}}}, evaluate, export]``.
A stage kind is registered like a plugin's (``register_stage``); the built-ins are registered here:

- ``fit``: Lightning ``Trainer.fit``. Settings: ``name``, ``optim`` and ``scheduler`` (merged onto the
  run's presets: a fresh optimiser per phase) and any ``pytorch_lightning.Trainer`` keyword (merged onto
  ``trainer``). Each phase checkpoints to its own folder (``checkpoints/`` for the phase named ``fit``,
  ``checkpoints/<name>/`` otherwise), so ``resume=auto`` continues the phase it stopped in; a finished
  phase restores its final weights and returns at once. Metrics of a phase not named ``fit`` are
  prefixed with its name.
- ``calibrate``: the engine's post-training loop (model on the run's device, each plugin's ``calibrate``).
- ``evaluate``: Lightning's validate loop over the val split (task and plugin metrics, reduced across
  processes), then each plugin's ``evaluate``.
- ``sample``: each plugin's ``sample``; scalars are logged, media (images, texts, tables) through
  ``RunContext.log_media``.
- ``export``: each plugin's export formats, or the whole model.

Settings other than ``name`` reach plugins as ``run.stage.settings``. With ``ema.decay`` set, evaluate,
sample and export see the EMA weights (trainer/ema.py). This module imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.registry import STAGES, register_stage

DEFAULT_FIT = "fit"


@dataclass(frozen=True)
class Stage:
    """One item of ``stages``: its kind, its unique name (the kind unless set) and its other settings."""

    kind: str
    name: str
    settings: dict = field(default_factory=dict)


def parse_stages(value: Any) -> list[Stage]:
    """The validated ``stages`` list; ``UserError`` for an unknown kind, bad settings or a repeated name."""
    from omegaconf import OmegaConf

    items = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if isinstance(items, str) or not isinstance(items, (list, tuple)):
        raise UserError(f"stages must be a list, e.g. [fit, evaluate], got {items!r}")
    stages: list[Stage] = []
    for item in items:
        if isinstance(item, dict) and len(item) == 1:
            kind, settings = next(iter(item.items()))
            settings = {} if settings is None else settings
        elif isinstance(item, str):
            kind, settings = item, {}
        else:
            raise UserError(f"a stage is a kind or {{kind: {{settings}}}}, e.g. {{fit: {{name: finetune}}}}; got {item!r}")
        if not isinstance(settings, dict):
            raise UserError(f"the settings of stage {kind} must be a mapping, got {settings!r}")
        settings = dict(settings)
        name = str(settings.pop("name", kind))
        schema = STAGES.entry(kind).schema
        if schema is not None:
            from blocktrain.trainer.validation import validate_node

            settings = OmegaConf.to_container(validate_node(settings, schema, f"stages.{name}"))
        stages.append(Stage(kind, name, settings))
    names = [s.name for s in stages]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"stage name '{repeated[0]}' is used twice in stages: give each repeated stage its own "
                        f"name, e.g. {{{repeated[0]}: {{name: {repeated[0]}2}}}}")
    return stages


def metric_prefix(stage: Stage | None) -> str:
    """``"<name>/"`` for a fit phase not named ``fit``, so phases keep apart in the logs; else ``""``."""
    return "" if stage is None or stage.name == DEFAULT_FIT else f"{stage.name}/"


# -- the built-in stages; ``run`` is the ``RunState`` of trainer/run.py ---------------------------
def fit(run, stage: Stage) -> None:
    run.fit(stage)


def calibrate(run, stage: Stage) -> None:
    run.model.to(run.ctx.device)
    run.model.eval()
    for plugin in run.plugins:
        plugin.calibrate(run.model, run.ctx)


def evaluate(run, stage: Stage) -> None:
    run.model.eval()
    with run.averaged():
        run.validate(stage)
        for plugin in run.plugins:
            values = dict(plugin.evaluate(run.model, run.ctx))
            if values:
                run.ctx.log(values)


def sample(run, stage: Stage) -> None:
    run.model.eval()
    with run.averaged():
        for plugin in run.plugins:
            outputs = dict(plugin.sample(run.model, run.ctx))
            scalars = {k: v for k, v in outputs.items() if isinstance(v, (int, float))}
            if scalars:
                run.ctx.log(scalars)
            media = {k: v for k, v in outputs.items() if k not in scalars}
            if media:
                run.ctx.log_media(media)


def export(run, stage: Stage) -> None:
    from blocktrain.trainer.run import export_model

    with run.averaged():
        export_model(run.model, run.plugins, run.run_dir / "export", run.ctx)


for _kind in ("fit", "calibrate", "evaluate", "sample", "export"):
    register_stage(_kind, f"blocktrain.trainer.stages:{_kind}")
