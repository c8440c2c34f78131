"""The open contract end to end: a third-party package that registers a task, a data kind, a model
source, a stage and a plugin (through the ``blocktrain.plugins`` entry point) runs from the CLI, with
two fit phases, named loss terms, a parameter group, validate-loop metrics, media and resume."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import interrupt_at, read_metrics, train

HERE = Path(__file__).parent
RECIPE = """\
# @package _global_
# the toy extension: two fit phases, evaluate, sample, its own stage, export
defaults:
  - override /plugin: [toy]
  - override /logger: wandb
model: {kind: toy_mlp, hidden: 8}
data: {kind: toy_points, batch_size: 8}
task: {kind: toy_regression}
trainer: {accelerator: cpu, max_steps: 6, log_every_n_steps: 1, enable_progress_bar: false}
optim: {lr: 0.01}
scheduler: {warmup_steps: 0}
checkpoint: {every_n_steps: 2}
stages: [fit, {fit: {name: head, max_steps: 4, optim: {lr: 0.05}}}, evaluate, sample, {report: {file: summary.txt}}, export]
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The toy extension installed as its own distribution (entry point ``toy``) into a target folder."""
    pkg = tmp_path_factory.mktemp("toyext_pkg")
    shutil.copy(HERE / "toy_extension.py", pkg / "toyext.py")
    shutil.copy(HERE / "toy_extension_impl.py", pkg / "toyext_impl.py")
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "toyext"
        version = "0.1"
        description = "A toy blocktrain extension"
        [tool.setuptools]
        py-modules = ["toyext", "toyext_impl"]
        [project.entry-points."blocktrain.plugins"]
        toy = "toyext:ToyPlugin"
        '''))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(pkg)], check=True, capture_output=True)
    return target


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=False)["state_dict"].items()}


def test_third_party_extension_runs_every_hook_end_to_end(site, tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "run"
    result = train(f"recipe={recipe}", f"run_dir={run_dir}", PYTHONPATH=str(site))
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = read_metrics(run_dir)
    assert metrics["status"] == "finished" and metrics["stage"] is None
    values = metrics["metrics"]
    for key in ("train/loss", "train/loss/task", "train/loss/toy/l2", "head/train/loss", "head/train/loss/toy/l2",
                "val/mse", "val/toy_abs_err"):
        assert key in values, key
    assert values["train/loss"] == pytest.approx(values["train/loss/task"] + values["train/loss/toy/l2"], rel=1e-5)
    assert values["toy/count"] == 2
    assert (run_dir / "summary.txt").read_text() == "report: 49\n"  # 4*8+8 + 8*1+1 parameters
    media = {p.name for p in (run_dir / "media").iterdir()}
    assert any(n.startswith("toy_grid_step") and n.endswith(".png") for n in media), media
    assert any(n.startswith("toy_texts_step") and n.endswith(".txt") for n in media), media

    first, head = _weights(run_dir / "checkpoints" / "last.ckpt"), _weights(run_dir / "checkpoints" / "head" / "last.ckpt")
    assert torch.equal(first["hidden.weight"], head["hidden.weight"])  # frozen in phase "head"
    assert not torch.equal(first["out.weight"], head["out.weight"])
    phase = torch.load(run_dir / "checkpoints" / "head" / "last.ckpt", weights_only=False)
    assert phase["global_step"] == 4
    groups = phase["optimizer_states"][0]["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == [0.05, 0.5]  # the phase's lr; the plugin's group

    again = train(f"recipe={recipe}", f"run_dir={run_dir}", "resume=auto", PYTHONPATH=str(site))
    assert again.returncode == 0, again.stderr[-3000:]
    for phase_dir in (run_dir / "checkpoints", run_dir / "checkpoints" / "head"):
        resumed = _weights(phase_dir / "last.ckpt")
        assert all(torch.equal(resumed[k], v) for k, v in (first if phase_dir.name == "checkpoints" else head).items())


def test_extension_kinds_are_validated_after_the_plugins_are_imported(site, tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    bad = train(f"recipe={recipe}", f"run_dir={tmp_path / 'run'}", "data.kind=toy_pointz", PYTHONPATH=str(site))
    assert bad.returncode != 0 and "unknown data.kind 'toy_pointz'. Valid kinds:" in bad.stderr
    assert "toy_points" in bad.stderr and "traceback" not in bad.stderr.lower()
    bad = train(f"recipe={recipe}", f"run_dir={tmp_path / 'run'}", "stages=[fit,{report:{fil:x}}]", PYTHONPATH=str(site))
    assert bad.returncode != 0 and "unknown key 'fil' in stages.report" in bad.stderr


def test_a_run_interrupted_in_its_second_fit_phase_resumes_there(site, tmp_path, monkeypatch):
    from blocktrain.trainer.cli import load_config
    from blocktrain.trainer.run import RunInterrupted, run

    from blocktrain.trainer.registry import DATA_KINDS, MODEL_KINDS, STAGES, TASKS

    for registry in (TASKS, DATA_KINDS, MODEL_KINDS, STAGES):  # the extension's kinds leave with this test
        assert len(registry)  # the built-ins are loaded before the copy
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.syspath_prepend(str(site))  # the entry point and modules of the installed extension
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    args = [f"recipe={recipe}", "logger=none"]
    run(load_config([*args, f"run_dir={tmp_path / 'straight'}"]))
    with pytest.raises(RunInterrupted, match="resume=auto"):
        run(load_config([*args, f"run_dir={tmp_path / 'resumed'}"]), extra_callbacks=[interrupt_at(2, "head/")])
    stopped = read_metrics(tmp_path / "resumed")
    assert stopped["status"] == "interrupted" and stopped["stage"] == "head"
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "head" / "last.ckpt", weights_only=False)["global_step"] == 2
    run(load_config([*args, f"run_dir={tmp_path / 'resumed'}", "resume=auto"]))
    for phase in ("checkpoints", "checkpoints/head"):
        straight, resumed = (_weights(tmp_path / d / phase / "last.ckpt") for d in ("straight", "resumed"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), phase
