"""Packaging: `pip install .` and a strict editable install both find conf/, recipes and plugins.

(The default lenient editable install is what the rest of the suite runs on.) Each install goes into
a fresh virtual environment that sees the already installed dependencies, and `train` runs from an
unrelated working directory.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env


@pytest.mark.parametrize("mode", ["wheel", "strict-editable"])
def test_install_mode_finds_configs_and_recipes(mode, tmp_path):
    venv = tmp_path / "venv"
    # no pip/setuptools of its own: the venv uses the outer ones (a modern setuptools) and no network
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    extra = ["-e", str(REPO), "--config-settings", "editable_mode=strict"] if mode == "strict-editable" else [str(REPO)]
    subprocess.run([*pip, *extra], check=True, cwd=tmp_path, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        return subprocess.run([str(venv / "bin" / "train"), *args], cwd=work, env=cli_env(), capture_output=True,
                              text=True)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import blocktrain.conf as c; print(c.__file__)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout
    assert ("__editable__" if mode == "strict-editable" else str(venv)) in where
    listing = run("--list")
    assert listing.returncode == 0 and "lora_text_classifier" in listing.stdout, listing.stderr
    composed = run("recipe=lora_text_classifier", "--cfg", "job")
    assert composed.returncode == 0, composed.stderr
    assert "kind: text_classification" in composed.stdout and "_plugin_: lora" in composed.stdout
    assert not Path(work).joinpath("outputs").exists()
