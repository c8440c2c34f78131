"""The rtn and gptq plugins through `run()`: they equal their cores, keep a pruner's zeros exactly zero, report
bits/weight, calibrate static activation ranges, refuse mistakes with one message before any calibration, and
their recipes run end to end from the CLI."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocktrain.plugins.quantization import gptq_quantize
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.compression.calibration import calibration_batches, calibration_forward
from blocktrain.trainer.compression.masks import find_linear_names
from blocktrain.trainer.compression.quant import QuantSpec, dequantize
from blocktrain.trainer.compression.quantizing import QuantizationPlugin
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.run import run
from blocktrain.trainer.sources.data import build_datasets
from tests.helpers import read_metrics, train

from .conftest import llm_args

def g16(plugin: str) -> list[str]:
    """Groups of 16 (they divide the tiny Llama's widths 32 and 64), 16 calibration windows, our own export."""
    return [f"plugin.{plugin}.group_size=16", f"plugin.{plugin}.calibration.samples=16",
            f"plugin.{plugin}.export_formats=[native]"]


def exported(run_dir: Path, plugin: str) -> dict[str, torch.Tensor]:
    """The codes, scales and zeros of the plugin's native export."""
    return load_file(str(run_dir / "export" / plugin / "native" / "model.safetensors"))


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each quantized layer's weight ŵ = s·(q − z) from an exported state dict."""
    return {k.removesuffix(".codes"): dequantize(v, state[k.replace(".codes", ".scale")],
                                                 state[k.replace(".codes", ".zero")])
            for k, v in state.items() if k.endswith(".codes")}


def test_gptq_plugin_equals_its_core(llama_dir, corpus, tmp_path):
    args = llm_args("gptq_llm", llama_dir, corpus, tmp_path / "run", *g16("gptq"), "plugin.gptq.act_order=true")
    run(load_config(args))
    cfg = load_config(args)
    data = build_datasets(cfg.data, tokenizer=AutoTokenizer.from_pretrained(llama_dir), seed=cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    names = find_linear_names(model)
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    gptq_quantize(model, calibration_batches(data, 16, 8, cfg.seed), QuantSpec(4, False, 16), calibration_forward,
                  names, act_order=True)
    state = exported(tmp_path / "run", "gptq")
    assert {k.removesuffix(".codes") for k in state if k.endswith(".codes")} == set(names)
    for name in names:
        layer = model.get_submodule(name)
        for part in ("codes", "scale", "zero"):
            assert torch.equal(state[f"{name}.{part}"], getattr(layer, part)), (name, part)
    metrics = read_metrics(tmp_path / "run")["metrics"]
    assert metrics["gptq/bits_per_weight"] == pytest.approx(4 + (16 + 4) / 16)  # codes + fp16 scale + 4-bit zero per 16
    assert metrics["gptq/calibrate_time_s"] > 0 and metrics["gptq/calibrate_peak_mem_gb"] > 0
    assert 0 < metrics["gptq/model_size_mb"] < fp32_mb


@pytest.mark.parametrize("pruner,quantizer", [("wanda", "rtn"), ("sparsegpt", "gptq")])
def test_pruned_weights_stay_exactly_zero(pruner, quantizer, llama_dir, corpus, tmp_path):
    prune = [f"plugin.{pruner}.calibration.samples=16"]
    run(load_config(llm_args(f"{pruner}_llm", llama_dir, corpus, tmp_path / "pruned", *prune)))
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned" / "export" / "model").state_dict()
    run(load_config(llm_args(f"{quantizer}_llm", llama_dir, corpus, tmp_path / "both", f"plugin=[{pruner},{quantizer}]",
                             *prune, *g16(quantizer))))
    weights = dequantized(exported(tmp_path / "both", quantizer))
    assert weights
    for name, w in weights.items():
        zeros = pruned[f"{name}.weight"] == 0
        assert zeros.float().mean() == pytest.approx(0.5, abs=0.05), name
        assert torch.all(w[zeros] == 0), name
    metrics = read_metrics(tmp_path / "both")["metrics"]
    assert metrics["sparsity/density"] <= 0.5  # the pruner's report, counted on the quantized weights
    assert f"{quantizer}/bits_per_weight" in metrics
    if quantizer == "gptq":  # without the mask, GPTQ's updates would fill the pruned entries: check it is what kept them
        run(load_config(llm_args("gptq_llm", llama_dir, corpus, tmp_path / "dense", *g16("gptq"),
                                 f"init_from={tmp_path / 'pruned' / 'export' / 'model' / 'model.safetensors'}")))
        dense = dequantized(exported(tmp_path / "dense", "gptq"))
        assert any(not torch.all(dense[n][pruned[f"{n}.weight"] == 0] == 0) for n in dense)


def test_static_activation_ranges_come_from_the_calibration_inputs(llama_dir, corpus, tmp_path):
    args = llm_args("rtn_llm", llama_dir, corpus, tmp_path / "run", *g16("rtn"), "plugin.rtn.act_bits=8",
                    "plugin.rtn.act_dynamic=false")
    run(load_config(args))
    state = exported(tmp_path / "run", "rtn")
    cfg = load_config(args)
    data = build_datasets(cfg.data, tokenizer=AutoTokenizer.from_pretrained(llama_dir), seed=cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    seen = []  # the first layer's inputs do not depend on any quantized layer
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        for batch in calibration_batches(data, 16, 8, cfg.seed):
            calibration_forward(model, batch)
    lo, hi = min(float(x.min()) for x in seen), max(float(x.max()) for x in seen)
    prefix = "model.layers.0.self_attn.q_proj"
    assert state[f"{prefix}.act_scale"].item() == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-6)
    assert state[f"{prefix}.act_scale"].shape == (1, 1)
    assert read_metrics(tmp_path / "run")["status"] == "finished"


@pytest.mark.parametrize("overrides,message", [
    (["plugin.rtn.bits=9"], r"plugin.rtn.bits=9 is not supported: weights are quantized to 2..8 bits"),
    (["plugin.rtn.bits=1"], r"plugin.rtn.bits=1 is not supported"),
    (["plugin.rtn.group_size=0"], r"plugin.rtn.group_size=0 is not supported: null .* or a positive number"),
    (["plugin.rtn.act_bits=3"], r"plugin.rtn.act_bits=3 is not supported: 4..8, or 16"),
    (["plugin.rtn.group_size=24"], r"plugin.rtn.group_size=24 does not divide the input width of \d+ target layer\(s\), "
                                   r"e.g. model.layers.0.self_attn.q_proj \(32 inputs\); use a divisor of 32, the widths' greatest common "
                                   r"divisor \(e.g. 32\)"),
    (["plugin.rtn.exclude=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"],
     r"plugin rtn: the model has no nn.Linear layers to quantize"),
    (["plugin=[rtn,gptq]"], r"plugin rtn cannot be combined with gptq \(another quantize plugin\)"),
    (["plugin=[rtn,wanda]"], r"plugin wanda prunes full-precision Linears, so it must come before the quantizer rtn: "
                             r"plugin=\[wanda,rtn\]"),
    (["plugin=[lora,rtn]"], r"plugin rtn \(quantize\) cannot come after plugin lora \(adapter\)"),
    (["plugin=[gptq]", "plugin.gptq.damp=0"], r"plugin.gptq.damp must be > 0"),
    (["plugin.rtn.export_formats=[gguf]"], r"plugin.rtn.export_formats: unknown format\(s\) \['gguf'\]"),
    (["plugin=[gptq]", "plugin.gptq.group_size=128"], r"plugin.gptq.group_size=128 does not divide"),
    (["plugin.rtn.group_size=24"], r"or set plugin.rtn.group_remainder=ragged \(the last group of each row covers "),
    (["plugin.rtn.group_remainder=even"], r"plugin.rtn.group_remainder='even' is not supported: 'error' .* 'ragged'"),
    (["plugin.rtn.group_size=24", "plugin.rtn.group_remainder=ragged"],
     r"plugin.rtn.group_remainder=ragged leaves 14 target layer\(s\) with a narrower last group \(e.g. "
     r"model.layers.0.self_attn.q_proj\), which the compressed-tensors format cannot hold .* set "
     r"plugin.rtn.export_formats=\[dequantized\]"),
])
def test_mistakes_get_one_message_before_calibration(overrides, message, llama_dir, corpus, tmp_path, monkeypatch):
    def calibrate(self, model, run):
        raise AssertionError("calibration started")

    monkeypatch.setattr(QuantizationPlugin, "calibrate", calibrate)
    with pytest.raises(UserError, match=message):
        run(load_config(llm_args("rtn_llm", llama_dir, corpus, tmp_path / "run", "plugin.rtn.group_size=16", *overrides)))


def test_export_stage_writes_formats_transformers_reloads(llama_dir, corpus, tmp_path):
    """The default export: a compressed-tensors folder and a dequantized one, both loaded by
    AutoModelForCausalLM, giving the logits of the native (QuantLinear) export reloaded by a run."""
    args = llm_args("rtn_llm", llama_dir, corpus, tmp_path / "run", "plugin.rtn.group_size=16",
                    "plugin.rtn.export_formats=[compressed-tensors,dequantized,native]")
    run(load_config(args))
    out = tmp_path / "run" / "export" / "rtn"
    assert sorted(p.name for p in out.iterdir()) == ["compressed-tensors", "dequantized", "native", "quantization.json"]
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        packed = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out / "dequantized").eval()(ids).logits
    state = exported(tmp_path / "run", "rtn")
    fake = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    fake.load_state_dict({**fake.state_dict(), **{f"{k}.weight": w for k, w in dequantized(state).items()}})
    with torch.no_grad():
        expected = fake(ids).logits
    assert torch.equal(plain, expected)
    assert torch.allclose(packed, expected, atol=1e-5)


def test_missing_compressed_tensors_is_refused_before_calibration(llama_dir, corpus, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors" else find_spec(name, *a))
    monkeypatch.setattr(QuantizationPlugin, "calibrate", lambda self, model, run: pytest.fail("calibration started"))
    with pytest.raises(UserError, match=r"plugin.rtn.export_formats includes compressed-tensors, which needs"):
        run(load_config(llm_args("rtn_llm", llama_dir, corpus, tmp_path / "run", "plugin.rtn.group_size=16")))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rtn_llm", "gptq_llm"])
def test_recipe_end_to_end_from_the_cli(recipe, llama_dir, corpus, tmp_path):
    plugin = recipe.removesuffix("_llm")
    done = train(*llm_args(recipe, llama_dir, corpus, tmp_path / "run", *g16(plugin)))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "finished" and metrics["metrics"]["val/ppl"] > 1
    assert metrics["metrics"][f"{plugin}/bits_per_weight"] == pytest.approx(5.25)
    state = exported(tmp_path / "run", plugin)
    codes = [v for k, v in state.items() if k.endswith(".codes")]
    assert len(codes) == 14 and all(int(c.min()) >= 0 and int(c.max()) <= 15 for c in codes)
