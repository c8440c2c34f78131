"""Where plugins and recipes are found: built-ins by name, third-party plugins by entry point.

Nothing here imports torch; a plugin's module is imported only by ``load_plugin_class``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

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
