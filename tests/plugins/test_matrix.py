"""Every registered plugin through the same path (Composer's tests/algorithms): compose -> validate -> a
2-step fit or calibrate on a tiny model -> resume after an interrupt equals the straight run -> export ->
a fresh run initialised from the export evaluates to the same metrics.

A plugin gets this by registering: its ``kind`` picks the scenario (the tiny model, data and stage it runs
on); ``TINY`` holds the few settings that shrink a method to toy scale. A plugin of a new kind adds a scenario.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.registry import available_plugins, load_plugin_class
from blocktrain.trainer.run import RunInterrupted, run
from blocktrain.trainer.validation import validate_config
from tests.helpers import interrupt_at, read_metrics

TINY = {  # toy-scale settings of a method (the defaults are the paper's)
    "blocklora": ["plugin.blocklora.targets=[query,value]", "plugin.blocklora.modules_to_save=[classifier]"],
    "wanda": ["plugin.wanda.calibration.samples=16"],
    "sparsegpt": ["plugin.sparsegpt.calibration.samples=16"],
    "rtn": ["plugin.rtn.group_size=16"],
    "gptq": ["plugin.gptq.group_size=16", "plugin.gptq.calibration.samples=16"],
    "cbq": ["plugin.cbq.calibration.samples=8", "plugin.cbq.calibration.batch_size=4", "plugin.cbq.epochs=1"],
    "lpvit": ["plugin.lpvit.block=[4,4]", "plugin.lpvit.calibration.samples=16", "plugin.lpvit.calibration.batch_size=8"],
    "h4g": ["plugin.h4g.hidden=16"],
    "icbs": ["plugin.icbs.epochs=1", "plugin.icbs.block_size=64", "plugin.icbs.k=32", "plugin.icbs.restarts=2", "plugin.icbs.beta_factor=1.6",
             "plugin.icbs.steps_per_epoch=8", "plugin.icbs.min_steps=0", "plugin.icbs.pruning.samples=8",
             "plugin.icbs.pruning.batch_size=4", "plugin.icbs.calibration.samples=16"],
}
COMMON = ["trainer=cpu", "logger=none", "trainer.enable_progress_bar=false"]


def adapter_scenario(name, tiny_bert_dir, sentiment_csv, llama_dir, corpus) -> tuple[list[str], str, str]:
    """A text classifier fine-tuned for 2 steps; reloaded from the adapter export."""
    train_csv, val_csv = sentiment_csv
    return ([f"recipe=lora_text_classifier", f"plugin=[{name}]", f"model.id={tiny_bert_dir}", f"data.train={train_csv}",
             f"data.val={val_csv}", "data.batch_size=8", "trainer.max_steps=2", "checkpoint.every_n_steps=1",
             "scheduler.warmup_steps=0", "optim.lr=3e-3", "stages=[fit,evaluate,export]"], "export", "val/loss")


def pruning_scenario(name, tiny_bert_dir, sentiment_csv, llama_dir, corpus) -> tuple[list[str], str, str]:
    """A causal LM pruned on a few calibration windows; reloaded from the exported model."""
    return ([f"recipe=wanda_llm", f"plugin=[{name}]", f"model.id={llama_dir}", f"data.files=[{corpus}]",
             "data.seq_len=16", "data.val_fraction=0.2", "data.batch_size=8", "stages=[calibrate,evaluate,export]"],
            "export/model/model.safetensors", "val/ppl")


def quantization_scenario(name, tiny_bert_dir, sentiment_csv, llama_dir, corpus) -> tuple[list[str], str, str]:
    """A causal LM quantized (calibrated on a few windows where the method reads data), exported in every format;
    reloaded from the native export, whose Linears hold integer codes and scales."""
    return ([f"recipe=gptq_llm", f"plugin=[{name}]", f"model.id={llama_dir}", f"data.files=[{corpus}]",
             "data.seq_len=16", "data.val_fraction=0.2", "data.batch_size=8", "stages=[calibrate,evaluate,export]",
             f"plugin.{name}.export_formats=[compressed-tensors,dequantized,native]"],
            f"export/{name}/native/model.safetensors", "val/ppl")


def generative_scenario(name, tiny_bert_dir, sentiment_csv, llama_dir, corpus) -> tuple[list[str], str, str]:
    """A flow-matching model (SiT or BFM) trained 2 steps on tiny idx images; reloaded from the exported model."""
    import tempfile

    from tests.plugins.bfm.tiny import tiny_args, write_tiny_idx

    root = write_tiny_idx(Path(tempfile.mkdtemp(prefix="idx_images_")))
    # EMA on (a fast decay, so the average moves visibly in 2 steps): resume must restore it with its step
    args = [a for a in tiny_args(name, root, root / "cache") if not a.startswith("stages=")]
    return ([f"recipe={'bfm_fashion' if name == 'bfm' else 'fm_fashion'}", *args, f"plugin.{name}.eval.num_samples=0", "ema.decay=0.5",
             "stages=[fit,evaluate,export]"], "export/model/model.safetensors", "val/fm_loss")


def model_scenario(name, tiny_bert_dir, sentiment_csv, llama_dir, corpus) -> tuple[list[str], str, str]:
    """A model built around a tiny text encoder, aligned for 2 steps on a small synthetic text-attributed graph and
    evaluated zero-shot; reloaded from its export."""
    return ([f"recipe={name}_synthetic", f"model.id={tiny_bert_dir}", "data.synthetic_nodes=48", "data.batch_size=8",
             "data.synthetic_vocab=600", "trainer.max_steps=2", "checkpoint.every_n_steps=1", "task.feature_cache=null",
             "stages=[fit,evaluate,export]"], f"export/{name}", "zeroshot/acc_mean")


def objective_scenario(name, tiny_bert_dir, sentiment_csv, llama_dir, corpus) -> tuple[list[str], str, str]:
    """A tiny Llama trained from scratch for 2 steps on synthetic sequences; reloaded from the exported model."""
    return (["recipe=bd3_lm", f"plugin=[{name}]", "data.num_train=32", "data.num_val=16", "data.seq_len=16",
             "data.batch_size=8", "model.config.hidden_size=32", "model.config.intermediate_size=64",
             "model.config.num_hidden_layers=1", "trainer.max_steps=2", "checkpoint.every_n_steps=1",
             "scheduler.warmup_steps=0", "stages=[fit,evaluate,export]"], "export/model/model.safetensors",
            "block_diffusion/nelbo")


SCENARIOS = {"adapter": adapter_scenario, "prune": pruning_scenario, "quantize": quantization_scenario,
             "generative": generative_scenario, "model": model_scenario, "objective": objective_scenario}
FITS = ("adapter", "generative", "model", "objective")  # kinds whose scenario is a fit, interrupted after a step


def _sigint_after_first_progress_step(monkeypatch) -> None:
    """A real Ctrl-C once a calibrate loop has finished its first step (every engine loop reports progress)."""
    import blocktrain.trainer.progress as progress

    original = progress.track

    def track(iterable, total=None, description=""):
        for i, item in enumerate(original(iterable, total, description)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    monkeypatch.setattr(progress, "track", track)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run_dir / "export").rglob("*.safetensors"))
    assert files, f"nothing exported under {run_dir / 'export'}"
    return {f"{f.relative_to(run_dir)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("name", sorted(available_plugins()))
def test_plugin_compose_run_resume_export_reload(name, tiny_bert_dir, sentiment_csv, llama_dir, corpus, tmp_path,
                                                  monkeypatch):
    kind = load_plugin_class(name).kind
    assert kind in SCENARIOS, f"plugin {name} has kind {kind!r}: add a scenario for it to this matrix"
    args, export, metric = SCENARIOS[kind](name, tiny_bert_dir, sentiment_csv, llama_dir, corpus)
    args = [*args, *COMMON, *TINY.get(name, [])]
    assert list(validate_config(load_config(args))) == [name]  # compose -> validate

    straight = tmp_path / "straight"
    run(load_config([*args, f"run_dir={straight}"]))
    assert read_metrics(straight)["status"] == "finished"

    resumed = tmp_path / "resumed"
    interrupted = False
    with monkeypatch.context() as patch:
        if kind in FITS:
            extra = [interrupt_at(1)]
        else:
            extra = []
            _sigint_after_first_progress_step(patch)
        try:
            run(load_config([*args, f"run_dir={resumed}"]), extra_callbacks=extra)
        except RunInterrupted:
            interrupted = True
    assert interrupted or kind == "prune" and name == "magnitude"  # magnitude is one step: nothing to interrupt
    if interrupted:
        assert read_metrics(resumed)["status"] == "interrupted"
    run(load_config([*args, f"run_dir={resumed}", "resume=auto"]))
    expected, got = _weights(straight), _weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    reloaded = tmp_path / "reloaded"
    run(load_config([*args, f"run_dir={reloaded}", f"init_from={straight / export}", "stages=[evaluate]"]))
    value = read_metrics(straight)["metrics"][metric]
    assert read_metrics(reloaded)["metrics"][metric] == pytest.approx(value, rel=1e-5)
