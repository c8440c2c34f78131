"""plugins/README.md kept true: every built-in plugin has each piece the page lists, the page lists every
attribute and hook of ``Plugin``, and its example is a working plugin."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from blocktrain.plugins import BUILTIN
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin, PluginConfig
from blocktrain.trainer.validation import PLUGIN_MARKER

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "plugins" / "README.md"
NAMES = sorted(BUILTIN)
CONTRACT = sorted(n for n in vars(Plugin) if not n.startswith("_"))  # class attributes and hooks


def plugin_class(name: str) -> type:
    module, _, attr = BUILTIN[name][0].partition(":")
    return getattr(importlib.import_module(module), attr)


def package_of(name: str) -> str:
    return plugin_class(name).__module__.rpartition(".")[0]


@pytest.fixture(scope="module")
def selected_by_recipes() -> dict[str, list[str]]:
    """Plugin name -> the built-in recipes that select it (compose each recipe, read the markers)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        cfg = load_config([f"recipe={path.stem}"])
        for name, node in (cfg.get("plugin") or {}).items():
            if node is not None and node.get(PLUGIN_MARKER) == name:
                found.setdefault(name, []).append(path.stem)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_plugin_class(name):
    cls = plugin_class(name)
    assert isinstance(cls, type) and issubclass(cls, Plugin)
    assert cls.name == name
    assert cls.description.strip() and cls.description == BUILTIN[name][1]
    assert cls.kind.strip(), f"{cls.__name__} sets no kind"
    assert dataclasses.is_dataclass(cls.config_class) and issubclass(cls.config_class, PluginConfig)
    assert package_of(name).startswith("blocktrain.plugins."), "a plugin lives in its own sub-package"


@pytest.mark.parametrize("name", NAMES)
def test_plugin_yaml_lists_the_config_fields(name):
    path = ROOT / "conf" / "plugin" / f"{name}.yaml"
    assert path.is_file(), f"{path} is missing"
    node = OmegaConf.load(path)
    assert node.get(PLUGIN_MARKER) == name
    fields = [f.name for f in dataclasses.fields(plugin_class(name).config_class)]
    assert [k for k in node if k != PLUGIN_MARKER] == fields, f"{path} must list exactly the config's fields, in order"


def imported_modules(path: Path) -> set[str]:
    """The absolute module names a source file imports (``from X import a`` also counts ``X.a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_plugin_imports_no_other_plugin(name):
    package = package_of(name)
    folder = ROOT / "plugins" / package.rpartition(".")[2]
    others = {f"blocktrain.plugins.{p.name}" for p in (ROOT / "plugins").iterdir() if p.is_dir()} - {package}
    for path in sorted(folder.rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if any(m == o or m.startswith(o + ".") for o in others))
        assert not bad, f"{path.relative_to(ROOT)} imports another plugin's package: {bad} (use the engine's libraries)"


@pytest.mark.parametrize("name", NAMES)
def test_plugin_package_has_readme_and_is_packaged(name):
    package = package_of(name)
    readme = Path(importlib.import_module(package).__file__).parent / "README.md"
    assert readme.is_file() and readme.read_text().strip(), f"{readme} is missing or empty"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert package in packages, f"{package} is not in pyproject.toml's [tool.setuptools] packages"


@pytest.mark.parametrize("name", NAMES)
def test_plugin_has_a_recipe_and_benchmark_results(name, selected_by_recipes):
    assert selected_by_recipes.get(name), f"no recipe under recipes/ selects plugin {name}"
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", results, re.IGNORECASE), \
        f"benchmarks/RESULTS.md does not mention {name}"


def test_page_lists_every_attribute_and_hook():
    assert {"apply", "loss", "calibrate", "export", "state_dict", "kind"} <= set(CONTRACT)
    text = PAGE.read_text()
    missing = [n for n in CONTRACT if not re.search(rf"`{n}[`(]", text)]
    assert not missing, f"plugins/README.md does not list Plugin.{', Plugin.'.join(missing)}"


def test_page_example_is_a_working_plugin():
    import torch

    text = PAGE.read_text()
    namespace: dict = {"__name__": "freeze_example"}
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, str(PAGE), "exec", dont_inherit=True), namespace)  # no `annotations` future import
    cls = namespace["FreezePlugin"]
    assert issubclass(cls, Plugin) and cls.name == "freeze" and cls.kind
    yaml = OmegaConf.create(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    assert yaml[PLUGIN_MARKER] == "freeze"
    assert [k for k in yaml if k != PLUGIN_MARKER] == [f.name for f in dataclasses.fields(cls.config_class)]
    with pytest.raises(UserError, match="head_lr"):
        cls.config_class(head_lr=0.0)

    plugin = cls(cls.config_class(keep="1."))
    model = plugin.apply(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)), run=None)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.weight", "1.bias"]
    [group] = plugin.param_groups(model, run=None)
    assert group["lr"] == plugin.config.head_lr and [p.shape for p in group["params"]] == [(2, 3), (2,)]
