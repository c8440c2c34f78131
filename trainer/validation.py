"""Config validation before anything heavy loads: one clear message per mistake.

Each config section is checked against a structured config (dataclass): unknown keys list the valid
ones, wrong types name the key, the expected type and the value given.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from blocktrain.trainer.errors import UserError

PLUGIN_MARKER = "_plugin_"  # set by each conf/plugin/NAME.yaml: `_plugin_: NAME`
TOP_LEVEL = ("name", "seed", "stages", "optimized_metric", "optimize_direction", "run_dir", "resume", "init_from",
             "checkpoint", "ema", "matmul_precision", "kernel_backend", "trainer", "logger", "optim", "scheduler", "model", "data", "task",
             "plugin")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    keep_last: int = 2


@dataclass
class EmaConfig:
    decay: Optional[float] = None  # null = no EMA
    targets: Optional[str] = None  # regex of parameter names; null = every trainable parameter


@dataclass
class WandbConfig:
    kind: str = "wandb"
    project: str = "blocktrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None


@dataclass
class CsvConfig:
    kind: str = "csv"


@dataclass
class NoLoggerConfig:
    kind: str = "none"


@dataclass
class SchedulerConfig:
    kind: str = "cosine"
    warmup_steps: int = 0
    warmup_epochs: Optional[float] = None  # warm-up over epochs of the fit's training data (DeiT: 5), for warmup_steps
    min_lr: float = 0.0


def check_warmup(scheduler) -> None:
    """``warmup_epochs`` replaces ``warmup_steps``: not both, and not negative."""
    epochs = scheduler.get("warmup_epochs")
    if epochs is not None and (epochs < 0 or scheduler.warmup_steps):
        raise UserError(f"scheduler.warmup_epochs={epochs} needs a value >= 0 and scheduler.warmup_steps=0 "
                        f"(got {scheduler.warmup_steps}): set one of the two")


LOGGERS = {"wandb": WandbConfig, "csv": CsvConfig, "none": NoLoggerConfig}
SCHEDULERS = ("cosine", "linear", "constant")


def validate_node(node: Any, schema: type, where: str, allow_missing: bool = False) -> DictConfig:
    """Merge ``node`` onto ``schema``'s defaults; raise UserError on unknown keys, wrong types and (unless
    ``allow_missing``) values left as ``???``."""
    valid = [f.name for f in fields(schema)]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
    except ConfigKeyError as exc:
        key = getattr(exc, "key", None) or _quoted(str(exc))
        raise UserError(f"unknown key '{key}' in {where}. Valid keys: {', '.join(valid)}") from None
    except ValidationError as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", "?")
        raise UserError(f"wrong type for {where}.{key}: {_first_line(exc)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing and not allow_missing:
        raise UserError(f"missing value for {where}: {', '.join(missing)} (set it on the command line, e.g. "
                        f"{where}.{missing[0]}=...)")
    return merged


def kind_schema(node: Any, schemas: dict[str, type], where: str) -> type:
    """The schema for a config node selected by its ``kind`` field."""
    kind = None if node is None else node.get("kind")
    if kind not in schemas:
        raise UserError(f"unknown {where}.kind '{kind}'. Valid kinds: {', '.join(schemas)}")
    return schemas[kind]


def validate_config(cfg: DictConfig, allow_missing: bool = False) -> dict[str, DictConfig]:
    """Validate every section of a composed run config; return the validated plugin configs by name.

    The plugins are validated (so imported) first: the task kinds, data kinds, model sources and stages
    they register are known when those sections are checked. ``allow_missing`` (``train ... --cfg job``):
    values left for the user (``???``) pass; keys and types are still checked. Local paths are not
    checked here but when a run starts (``check_local_paths``).
    """
    from blocktrain.trainer.sources.config import validate_data_config, validate_model_config
    from blocktrain.trainer.stages import parse_stages
    from blocktrain.trainer.tasks import validate_task_config

    unknown = [k for k in cfg if k not in TOP_LEVEL]
    if unknown:
        raise UserError(f"unknown config key '{unknown[0]}'. Valid top-level keys: {', '.join(TOP_LEVEL)}")
    plugins = validate_plugins(cfg.plugin or {}, allow_missing)
    stages = parse_stages(cfg.stages)
    if cfg.resume not in (None, "auto") and not isinstance(cfg.resume, str):
        raise UserError(f"resume must be null, 'auto' or a checkpoint path, got {cfg.resume!r}")
    if cfg.kernel_backend not in ("auto", "triton", "compiled", "reference"):
        raise UserError(f"kernel_backend must be auto, triton, compiled or reference, got {cfg.kernel_backend!r}")
    if cfg.optimize_direction not in ("maximize", "minimize"):
        raise UserError(f"optimize_direction must be maximize or minimize, got {cfg.optimize_direction!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UserError(f"wrong type for seed: expected an integer, got {cfg.seed!r}")
    validate_node(cfg.checkpoint, CheckpointConfig, "checkpoint", allow_missing)
    ema = validate_node(cfg.get("ema"), EmaConfig, "ema", allow_missing)
    if ema.decay is not None and not 0 < ema.decay < 1:
        raise UserError(f"ema.decay must be in (0, 1), e.g. 0.9999, got {ema.decay}")
    validate_node(cfg.logger, kind_schema(cfg.logger, LOGGERS, "logger"), "logger", allow_missing)
    if cfg.scheduler.get("kind") not in SCHEDULERS:
        raise UserError(f"unknown scheduler.kind '{cfg.scheduler.get('kind')}'. Valid kinds: {', '.join(SCHEDULERS)}")
    check_warmup(validate_node(cfg.scheduler, SchedulerConfig, "scheduler", allow_missing))
    if "_target_" not in cfg.optim:
        raise UserError("optim needs a _target_ (an optimizer class path), e.g. optim=adamw")
    if cfg.model is None:
        raise UserError("no model configured: pass recipe=NAME (see `train --list`) or model=<preset> model.id=...")
    validate_model_config(cfg.model, allow_missing)
    needs_data = [s.name for s in stages if s.kind in ("fit", "calibrate")]
    if cfg.data is None and needs_data:
        raise UserError(f"no data configured: the stages {', '.join(needs_data)} need data=<preset>")
    if cfg.data is not None:
        validate_data_config(cfg.data, allow_missing)
    if cfg.task is not None:
        validate_task_config(cfg.task)
    return plugins


def check_local_paths(cfg: DictConfig) -> None:
    """Every local path the run names exists: the model's and the data's, ``init_from`` and ``resume``.

    Called when a run starts, before anything downloads or loads, so a typo costs no hub retries.
    """
    from pathlib import Path

    from blocktrain.trainer.sources.config import check_source_paths

    check_source_paths(cfg.model, cfg.data)
    for key, path in (("init_from", cfg.init_from), ("resume", None if cfg.resume == "auto" else cfg.resume)):
        if path is not None and not Path(str(path)).expanduser().exists():
            raise UserError(f"{key} path not found: {path}")


def validate_plugins(section: Any, allow_missing: bool = False) -> dict[str, DictConfig]:
    """Check each selected plugin's config against its dataclass and the pipeline order.

    A plugin is selected when its group config (``plugin=[a,b]``) was loaded, which leaves the
    ``_plugin_`` marker; settings a recipe left for a plugin that is no longer selected are ignored.
    """
    from blocktrain.trainer.registry import load_plugin_class

    validated, instances = {}, []
    for name, node in section.items():
        if node is None or node.get(PLUGIN_MARKER) != name:
            print(f"warning: plugin.{name} is configured but '{name}' is not in the plugin list; ignored "
                  f"(select it with plugin=[...,{name}])", file=sys.stderr)
            continue
        cls = load_plugin_class(name)
        node = OmegaConf.masked_copy(node, [k for k in node if k != PLUGIN_MARKER])
        validated[name] = validate_node(node, cls.config_class, f"plugin.{name}", allow_missing)
        if OmegaConf.missing_keys(validated[name]):
            continue  # values left for the user (allow_missing): the combination is checked when they are set
        instances.append(cls(OmegaConf.to_object(validated[name])))
    for i, plugin in enumerate(instances):
        check_combination(plugin, instances[:i], instances[i + 1:])
        plugin.check_pipeline(instances[:i])
    return validated


def check_combination(plugin, before: list, after: list) -> None:
    """``plugin.requires`` (names or kinds) must come earlier in the plugin list; ``plugin.conflicts`` must
    not be anywhere else in it; ``plugin.refuses_after`` not later in it."""
    def matches(other, ref: str) -> bool:
        return ref in (other.name, other.kind)

    for ref in plugin.requires:
        if not any(matches(p, ref) for p in before):
            raise UserError(f"plugin {plugin.name} needs a '{ref}' plugin before it in the plugin list, "
                            f"e.g. plugin=[{ref},{plugin.name}]")
    for other in [*before, *after]:
        clash = next((ref for ref in plugin.conflicts if matches(other, ref)), None)
        if clash is not None:
            what = f"another {clash} plugin" if clash == other.kind else clash
            raise UserError(f"plugin {plugin.name} cannot be combined with {other.name} ({what}); choose one")
    for other in after:
        if any(matches(other, ref) for ref in plugin.refuses_after):
            raise UserError(f"plugin {other.name} ({other.kind or 'plugin'}) cannot come after plugin {plugin.name} "
                            f"({plugin.kind or 'plugin'}): it would act on {plugin.name}'s layers. Put it first, "
                            f"e.g. plugin=[{other.name},{plugin.name}]")


def explain_composition_error(exc: Exception, overrides: list[str]) -> str:
    """Turn a Hydra/OmegaConf composition error into a short message with the valid choices."""
    text = str(exc).strip()
    key = _quoted(text)
    if key and ("Could not override" in text or "not in struct" in text or "Key '" in text):
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(parent, overrides)
        hint = f" Valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}." if valid else ""
        return f"unknown config key '{key}'.{hint} To add a new key use +{key}=..."
    match = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", text)
    if match:
        group, option = match.groups()
        return f"unknown {group} '{option}'. Valid choices for {group}: {', '.join(_group_options(group))}"
    if "mismatched input" in text or "extraneous input" in text or "no viable alternative" in text:
        return f"cannot parse the command-line override: {_first_paragraphs(text)}"
    return _first_paragraphs(text)


def _valid_keys(parent: str, overrides: list[str]) -> list[str]:
    """Keys at ``parent`` in the config composed without the offending overrides."""
    from hydra import compose

    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("recipe",) or o.startswith(("trainer=", "logger=",
            "optim=", "scheduler=", "model=", "data=", "task=", "plugin="))]
    try:
        cfg = compose(config_name="config", overrides=kept)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except OmegaConfBaseException:
        return []
    except Exception:  # noqa: BLE001 - a hint only; never mask the original error
        return []
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _group_options(group: str) -> list[str]:
    """The options of a config group: YAML files under conf/<group>, plus registered plugins."""
    from importlib import resources

    from blocktrain.trainer.registry import available_plugins, builtin_recipes

    if group == "plugin":
        return sorted(available_plugins())
    if group == "recipe":
        return sorted(builtin_recipes())
    folder = resources.files("blocktrain.conf").joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def _quoted(text: str) -> str | None:
    match = re.search(r"'([^']+)'", text)
    return match.group(1) if match else None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _first_paragraphs(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.strip() and "full_key" not in line
                     and "object_type" not in line and "reference_type" not in line)

