"""Every `train` command in README.md's shell blocks composes and validates as printed.

A single run is run as printed with `--cfg job` added (the config it would run, validated; local paths
are checked only when a run starts, so commands naming data or packages not installed here compose too).
A multirun (`-m`) is not launched: its overrides are parsed by Hydra, and enough sweep points are composed,
the Hydra part (sweeper, launcher) included, that every value of every sweep is composed and validated once.
"""
from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from blocktrain.trainer.cli import CONFIG_MODULE, load_config
from blocktrain.trainer.validation import validate_config
from tests.helpers import REPO, train

MULTIRUN = ("-m", "--multirun")


def readme_commands() -> list[list[str]]:
    """The arguments of every `train` command in README.md's bash blocks (continuation lines joined,
    comments and leading ``VAR=value`` assignments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"[A-Za-z_]\w*=", words[0]):
                words.pop(0)
            if words[:1] == ["train"]:
                commands.append(words[1:])
    return commands


COMMANDS = readme_commands()
SINGLE = [c for c in COMMANDS if not set(c) & set(MULTIRUN)]
SWEEPS = [[a for a in c if a not in MULTIRUN] for c in COMMANDS if set(c) & set(MULTIRUN)]


def test_the_readme_commands_are_found():
    assert len(SINGLE) >= 15 and len(SWEEPS) >= 5
    assert ["recipe=blocklora_clip_demo"] in SINGLE and ["--list"] in SINGLE


@pytest.mark.parametrize("args", SINGLE, ids=lambda a: " ".join(a)[:70])
def test_readme_command_runs_as_printed(args, tmp_path):
    own = tmp_path / "path" / "to" / "my_recipe.yaml"  # the README's example of a recipe file of your own
    own.parent.mkdir(parents=True)
    own.write_text("# @package _global_\ndefaults:\n  - /recipe/lora_text_classifier\ndata:\n  train: train.csv\n")
    flags = any(a.startswith("--") for a in args)
    result = train(*args, *([] if flags else ["--cfg", "job"]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    if not flags:
        assert "stages:" in result.stdout and "???" not in result.stdout.split("hydra:")[0], result.stdout


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Override lists of single runs such that every value of every sweep appears in one of them
    (both ends of an interval)."""
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif override.is_discrete_sweep():
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([f"{key}={override.value().start}", f"{key}={override.value().end}"])
    return [[c[i % len(c)] for c in choices] for i in range(max(map(len, choices)))]


@pytest.mark.parametrize("overrides", SWEEPS, ids=lambda a: " ".join(a)[:70])
def test_readme_sweep_composes_at_every_value(overrides):
    for point in sweep_points(overrides):
        validate_config(load_config(point))  # every value set; local paths are checked when a run starts
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            hydra = compose(config_name="config", overrides=point, return_hydra_config=True).hydra
        assert hydra.sweeper and hydra.launcher
