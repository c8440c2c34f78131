"""Packaging: every install mode finds conf/, recipes and plugins, from an unrelated working directory.

Each install goes into a fresh virtual environment that sees *this* environment's packages (the
dependencies, and pip and setuptools from the `dev` extra), never the base interpreter's, and is built
offline without build isolation: the suite must pass in a fresh venv whatever the base Python has.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

MODES = {  # README: `pip install -e ".[dev]"` and `pip install .`; strict editable for good measure
    "wheel": [str(REPO)],
    "editable": ["-e", str(REPO)],
    "strict-editable": ["-e", str(REPO), "--config-settings", "editable_mode=strict"],
}


def _run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}"
    return result


def venv_seeing_this_environment(venv: Path) -> Path:
    """A venv without pip or system site-packages whose python imports from this interpreter's
    site-packages folders (listed in a .pth file); returns its python."""
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    Path(site, "this_environment.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.mark.parametrize("mode", sorted(MODES))
def test_install_mode_finds_configs_and_recipes(mode, tmp_path):
    python = venv_seeing_this_environment(tmp_path / "venv")
    # offline, with this environment's setuptools; --check-build-dependencies names a too-old one
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         "--check-build-dependencies", *MODES[mode], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def train(*args):
        return subprocess.run([str(python.parent / "train"), *args], cwd=work, env=cli_env(), capture_output=True,
                              text=True)

    where = _run(python, "-c", "import blocktrain.conf as c; print(c.__file__)", cwd=work).stdout
    expected = {"wheel": str(tmp_path / "venv"), "editable": str(REPO / "conf"), "strict-editable": "__editable__"}
    assert expected[mode] in where, where
    listing = train("--list")
    assert listing.returncode == 0 and "lora_text_classifier" in listing.stdout, listing.stderr
    composed = train("recipe=lora_text_classifier", "--cfg", "job")
    assert composed.returncode == 0, composed.stderr
    assert "kind: text_classification" in composed.stdout and "_plugin_: lora" in composed.stdout
    assert not Path(work).joinpath("outputs").exists()
