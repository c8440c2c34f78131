"""The pruning plugins through `run()`: they equal their cores, resume to the same result after Ctrl-C,
continue a finished iCBS run with more epochs, and refuse mistakes with one message."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocktrain.plugins.icbs.pruner import ICBSPruner
from blocktrain.plugins.sparsity import magnitude_prune, sparsegpt_prune, wanda_prune
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.run import RunInterrupted, run
from blocktrain.trainer.sources.data import build_datasets
from tests.helpers import read_metrics

from .conftest import ICBS_FAST, llm_args


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model").state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def core_result(args: list[str], llama_dir: Path, prune) -> dict[str, torch.Tensor]:
    """The core's pruning of the original model on the calibration batches the plugin draws."""
    cfg = load_config(args)
    data = build_datasets(cfg.data, tokenizer=AutoTokenizer.from_pretrained(llama_dir), seed=cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    batches = calibration_batches(data, 16, 8, cfg.seed)
    prune(model, batches)
    return model.state_dict()


CORES = {
    "magnitude_llm": lambda m, b: magnitude_prune(m, 0.5, find_linear_names(m), "layer"),
    "wanda_llm": lambda m, b: wanda_prune(m, b, calibration_forward, 0.5, find_linear_names(m), "row", sequential=True),
    "sparsegpt_llm": lambda m, b: sparsegpt_prune(m, b, calibration_forward, 0.5, find_linear_names(m), "2:4", blocksize=8),
}


@pytest.mark.parametrize("recipe", sorted(CORES))
def test_plugin_equals_its_core(recipe, llama_dir, corpus, tmp_path):
    plugin = recipe.removesuffix("_llm")
    extra = [] if plugin == "magnitude" else [f"plugin.{plugin}.calibration.samples=16"]
    extra += ["plugin.sparsegpt.pattern=2:4", "plugin.sparsegpt.blocksize=8"] if plugin == "sparsegpt" else []
    args = llm_args(recipe, llama_dir, corpus, tmp_path / "run", *extra)
    run(load_config(args))
    assert_same_weights(exported(tmp_path / "run"), core_result(args, llama_dir, CORES[recipe]))


def _sigint_after(monkeypatch, owner, attr: str, count: int, done) -> None:
    """Send this process a real SIGINT right after the ``count``-th call of ``owner.attr`` returns."""
    original = getattr(owner, attr)
    calls = []

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(owner, attr, wrapper)
    done.append(calls)


@pytest.mark.parametrize("plugin", ["icbs", "sparsegpt"])
def test_interrupted_calibrate_resumes_to_the_same_model(plugin, llama_dir, corpus, tmp_path, monkeypatch):
    if plugin == "icbs":
        extra, owner, attr = [*ICBS_FAST, "plugin.icbs.epochs=2"], ICBSPruner, "step"
    else:
        import blocktrain.plugins.sparsity.sparsegpt as owner

        extra, attr = ["plugin.sparsegpt.calibration.samples=16"], "sparsegpt_layer"
    recipe = f"{plugin}_llm"
    run(load_config(llm_args(recipe, llama_dir, corpus, tmp_path / "straight", *extra)))

    args = llm_args(recipe, llama_dir, corpus, tmp_path / "resumed", *extra)
    calls: list = []
    with monkeypatch.context() as patch:
        _sigint_after(patch, owner, attr, 5, calls)
        with pytest.raises(RunInterrupted, match="resume=auto"):
            run(load_config(args))
    assert len(calls[0]) == 5  # the signal was held until the step finished, then the loop stopped
    assert read_metrics(tmp_path / "resumed")["status"] == "interrupted"
    saved = torch.load(tmp_path / "resumed" / "state" / f"{plugin}.pt", weights_only=False)["payload"]
    assert (saved["steps_done"] if plugin == "icbs" else len(saved)) == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run(load_config([*args, "resume=auto"]))

    assert read_metrics(tmp_path / "resumed")["status"] == "finished"
    assert_same_weights(exported(tmp_path / "straight"), exported(tmp_path / "resumed"))
    if plugin == "icbs":
        states = [torch.load(tmp_path / d / "state" / "icbs.pt", weights_only=False)["payload"]
                  for d in ("straight", "resumed")]
        assert states[0]["steps_done"] == states[1]["steps_done"] == 16
        assert states[0]["dL_track"] == states[1]["dL_track"]


def test_more_icbs_epochs_continue_a_finished_run(llama_dir, corpus, tmp_path):
    run(load_config(llm_args("icbs_llm", llama_dir, corpus, tmp_path / "two", *ICBS_FAST, "plugin.icbs.epochs=2")))
    args = llm_args("icbs_llm", llama_dir, corpus, tmp_path / "one", *ICBS_FAST)
    run(load_config([*args, "plugin.icbs.epochs=1"]))
    assert read_metrics(tmp_path / "one")["metrics"]["icbs/steps"] == 8
    run(load_config([*args, "plugin.icbs.epochs=2", "resume=auto"]))
    metrics = read_metrics(tmp_path / "one")["metrics"]
    assert metrics["icbs/steps"] == 16 and metrics["icbs/epochs_done"] == 2
    assert_same_weights(exported(tmp_path / "two"), exported(tmp_path / "one"))
    with pytest.raises(UserError, match=r"cannot resume icbs: .*plugin.icbs.density=0.5, this run has 0.4"):
        run(load_config([*args, "plugin.icbs.density=0.4", "resume=auto"]))
    with pytest.raises(UserError, match="already holds checkpoints"):
        run(load_config(args))


def test_zero_icbs_epochs_give_the_one_pass_wanda_mask_and_steps_move_it(llama_dir, corpus, tmp_path):
    run(load_config(llm_args("icbs_llm", llama_dir, corpus, tmp_path / "icbs", *ICBS_FAST, "plugin.icbs.epochs=0")))
    run(load_config(llm_args("wanda_llm", llama_dir, corpus, tmp_path / "wanda", "plugin.wanda.sequential=false",
                             "plugin.wanda.calibration.samples=16")))
    assert_same_weights(exported(tmp_path / "icbs"), exported(tmp_path / "wanda"))
    assert "icbs/dL_mean" not in read_metrics(tmp_path / "icbs")["metrics"]
    run(load_config(llm_args("icbs_llm", llama_dir, corpus, tmp_path / "one", *ICBS_FAST)))
    zero, one = exported(tmp_path / "icbs"), exported(tmp_path / "one")
    moved = [k for k in zero if not torch.equal(zero[k], one[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)


@pytest.mark.parametrize("overrides,message", [
    (["plugin=[wanda,icbs]"], "plugin wanda cannot be combined with icbs \\(another prune plugin\\)"),
    (["plugin.wanda.pattern=2:4", "plugin.wanda.density=0.3"], r"keeps 2/4 of the weights .* set plugin.wanda.density=0.5"),
    (["plugin.wanda.pattern=diagonal"], "plugin.wanda.pattern must be layer, row or N:M"),
    (["plugin=[sparsegpt]", "plugin.sparsegpt.pattern=row"], "plugin.sparsegpt.pattern must be layer or N:M"),
    (["plugin.wanda.calibration.samples=100000"], r"calibration.samples=100000 but the train split has only \d+"),
    (["plugin=[icbs]", "plugin.icbs.block_size=9000"], r"plugin.icbs: block_size must be in \[1, 8192\]"),
    (["plugin.wanda.exclude=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"], "no nn.Linear layers"),
])
def test_mistakes_get_one_message(overrides, message, llama_dir, corpus, tmp_path):
    with pytest.raises(UserError, match=message):
        run(load_config(llm_args("wanda_llm", llama_dir, corpus, tmp_path / "run", *overrides)))


def test_icbs_takes_the_tasks_per_sample_loss(tmp_path):
    from omegaconf import OmegaConf

    from blocktrain.plugins.icbs import ICBSPlugin, ICBSPluginConfig
    from blocktrain.trainer.context import RunContext
    from blocktrain.trainer.tasks.base import Task
    from blocktrain.trainer.tasks.language import CausalLMTask

    plugin = ICBSPlugin(ICBSPluginConfig())
    run = RunContext(cfg=OmegaConf.create({"task": {"kind": "toy"}}), run_dir=tmp_path, metrics=None, task=Task(None, {}))
    with pytest.raises(UserError, match="plugin icbs needs a per-sample loss, and task toy has none"):
        plugin.loss_fn(run)
    run.task = CausalLMTask(None, {})
    assert plugin.loss_fn(run) == run.task.per_sample_loss
