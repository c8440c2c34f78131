"""Where plugins, recipes and the engine's extension points are found.

Plugins: built-ins by name, third-party plugins by the ``blocktrain.plugins`` entry points. Extension
points — task kinds, data kinds, model sources and stages — are ``Registry`` objects that built-ins and
plugins fill the same way (``register_task`` ...), at import of the module that defines them. Nothing
here imports torch; a plugin's module is imported only when it is used.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterator

from blocktrain.plugins import BUILTIN
from blocktrain.trainer.errors import UserError

ENTRY_POINT_GROUP = "blocktrain.plugins"


@dataclass(frozen=True)
class PluginEntry:
    name: str
    target: str  # "module:Class"
    description: str
    origin: str  # "built-in" or the distribution that provides it


def available_plugins() -> dict[str, PluginEntry]:
    """All known plugins by name; a built-in wins a name clash with a third-party plugin."""
    found = {name: PluginEntry(name, target, desc, "built-in") for name, (target, desc) in BUILTIN.items()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue
        dist = ep.dist.metadata if ep.dist is not None else {}
        found[ep.name] = PluginEntry(ep.name, ep.value, (dist.get("Summary") or "").strip(),
                                     ep.dist.name if ep.dist is not None else "entry point")
    return found


def load_plugin_class(name: str):
    """Import and return the ``Plugin`` subclass registered under ``name``."""
    plugins = available_plugins()
    if name not in plugins:
        raise UserError(f"unknown plugin '{name}'. Valid plugins: {', '.join(sorted(plugins))}")
    module_name, _, attr = plugins[name].target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    from blocktrain.trainer.plugin import Plugin

    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise UserError(f"plugin '{name}' ({plugins[name].target}) is not a blocktrain Plugin subclass")
    return cls


def import_third_party_plugins() -> None:
    """Import every entry-point plugin's module, so the kinds and stages it registers are known."""
    for name, entry in available_plugins().items():
        if entry.origin != "built-in":
            load_plugin_class(name)


# -- extension points --------------------------------------------------------------------------
@dataclass(frozen=True)
class Extension:
    """One registered kind: its config dataclass (``None`` if it takes no settings) and implementation."""

    name: str
    schema: type | None
    target: str  # "module:attribute", imported on first use
    description: str = ""


class Registry(Mapping):
    """Name -> config dataclass of one extension point, read like a dict; ``load`` imports the implementation.

    The built-in entries are registered by ``builtins`` (modules imported on first use); plugins add
    theirs with ``register`` when their module is imported. A lookup of an unknown name first imports
    the third-party plugins (they may contribute it); a built-in name cannot be taken over.
    """

    def __init__(self, what: str, builtins: tuple[str, ...], plural: str = "kinds"):
        self.what, self._builtins, self._plural = what, builtins, plural
        self._entries: dict[str, Extension] = {}
        self._loaded = False

    def register(self, name: str, schema: type | None, target: str, description: str = "") -> None:
        old, new = self._entries.get(name), Extension(name, schema, target, description)
        if old is not None and old.target != target:
            builtin = [e for e in (old, new) if e.target.startswith("blocktrain.")]
            if len(builtin) != 1:
                raise UserError(f"{self.what} '{name}' is registered twice: {old.target} and {target}")
            other = new if builtin[0] is old else old
            print(f"warning: {self.what} '{name}' is built in; {other.target} is ignored", file=sys.stderr)
            new = builtin[0]
        self._entries[name] = new

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)

    def entry(self, name: str) -> Extension:
        """The entry for ``name``; ``UserError`` listing the valid names when there is none."""
        self._load_builtins()
        if name not in self._entries:
            import_third_party_plugins()
        if name not in self._entries:
            raise UserError(f"unknown {self.what} '{name}'. Valid {self._plural}: {', '.join(self._entries)}")
        return self._entries[name]

    def load(self, name: str) -> Any:
        """The implementation registered for ``name`` (imported now)."""
        module, _, attr = self.entry(name).target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __getitem__(self, name: str) -> type | None:
        self._load_builtins()
        return self._entries[name].schema

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load_builtins()
        return iter(dict(self._entries))

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)


_CLIP = "blocktrain.trainer.clip.config"  # the CLIP few-shot library's kinds
_GENERATIVE = "blocktrain.trainer.generative.config"  # idx image data, the SiT and BFM models
_GRAPH = "blocktrain.trainer.graph.config"  # text-attributed graphs and zero-shot node classification
TASKS = Registry("task.kind", ("blocktrain.trainer.tasks", _CLIP, _GRAPH))
DATA_KINDS = Registry("data.kind", ("blocktrain.trainer.sources.config", _CLIP, _GENERATIVE, _GRAPH))
MODEL_KINDS = Registry("model.kind", ("blocktrain.trainer.sources.config", _CLIP, _GENERATIVE))
STAGES = Registry("stage", ("blocktrain.trainer.stages",), plural="stages")


def register_task(kind: str, schema: type, target: str, description: str = "") -> None:
    """A task kind (``task.kind``): ``schema`` its config dataclass, ``target`` a ``Task`` subclass."""
    TASKS.register(kind, schema, target, description)


def register_data_kind(kind: str, schema: type, target: str, description: str = "") -> None:
    """A data kind (``data.kind``): ``target(cfg, tokenizer, seed) -> Datasets``."""
    DATA_KINDS.register(kind, schema, target, description)


def register_model_source(kind: str, schema: type, target: str, description: str = "") -> None:
    """A model source (``model.kind``): ``target`` an object with ``load_processor(cfg)`` and
    ``load(cfg, processor) -> LoadedModel`` — a hub loader, or a model a plugin builds from its config."""
    MODEL_KINDS.register(kind, schema, target, description)


def register_stage(kind: str, target: str, schema: type | None = None, description: str = "") -> None:
    """A stage kind for ``stages: [...]``: ``target(run: RunState, stage: Stage)``; ``schema`` its settings."""
    STAGES.register(kind, schema, target, description)


# -- recipes ----------------------------------------------------------------------------------
def builtin_recipes() -> dict[str, Path]:
    """Recipe name -> YAML file shipped in ``blocktrain.recipes``."""
    root = resources.files("blocktrain.recipes")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def recipe_description(path: Path) -> str:
    """The first comment line after the package header: a recipe's one-line description."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#") and "@package" not in line and line.lstrip("# ").strip():
            return line.lstrip("# ").strip()
        if line and not line.startswith("#"):
            break
    return ""


def resolve_recipe(value: str) -> tuple[str, Path]:
    """A recipe name or a path to a user's YAML -> (name, file). Unknown names list the valid ones."""
    candidate = Path(value).expanduser()
    if value.endswith((".yaml", ".yml")) or "/" in value:
        if not candidate.is_file():
            raise UserError(f"recipe file not found: {candidate}")
        return candidate.stem, candidate.resolve()
    recipes = builtin_recipes()
    if value not in recipes:
        raise UserError(f"unknown recipe '{value}'. Valid recipes: {', '.join(sorted(recipes))}")
    return value, recipes[value]

