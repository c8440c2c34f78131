"""A ragged last group (``group_remainder: ragged``): n_groups = ⌈in/g⌉, the last group covers the remaining
columns with its own range; the grid round-trips, divisible widths are unchanged, RTN / GPTQ / CBQ run it through
`run()`, and the default and the compressed-tensors export refuse it with one message each."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from blocktrain.plugins.cbq.quantizer import CBQLinear
from blocktrain.plugins.quantization import gptq_layer, rtn_layer, search_clip
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.compression.quant import (QuantSpec, dequantize, expand_groups, fake_quantize, minmax_qparams,
                                                  qrange, quantize)
from blocktrain.trainer.run import run
from tests.helpers import read_metrics

from .conftest import llm_args

RAGGED = QuantSpec(4, False, 8, ragged=True)


def weight(rows=6, cols=20, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_a_width_the_group_size_does_not_divide_is_an_error_naming_the_switch():
    with pytest.raises(ValueError, match="group_size 8 does not divide the input width 20 .*group_remainder: ragged"):
        minmax_qparams(weight(), QuantSpec(4, False, 8))
    assert RAGGED.n_groups(20) == 3 and RAGGED.n_groups(24) == 3 and QuantSpec(4, False, None, True).n_groups(20) == 1


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_ragged_grid_values_round_trip_exactly(bits, symmetric):
    spec = QuantSpec(bits, symmetric, 8, ragged=True)
    w = weight()
    w[0, 16:] = 0.0  # the whole last group of row 0
    scale, zero = minmax_qparams(w, spec)
    assert scale.shape == zero.shape == (6, 3)
    codes = quantize(w, scale, zero, spec)
    lo, hi = qrange(spec)
    assert codes.min() >= lo and codes.max() <= hi
    grid = dequantize(codes, scale, zero, group_size=8)
    assert torch.equal(quantize(grid, scale, zero, spec), codes)
    assert torch.equal(fake_quantize(grid, scale, zero, spec), grid)
    assert torch.all(grid[0, 16:] == 0)
    step = torch.cat([scale.repeat_interleave(8, 1)[:, :16], scale[:, 2:].expand(6, 4)], 1)
    assert torch.all((grid - w).abs() <= step / 2 + 1e-6)


def test_the_last_group_takes_its_range_from_its_own_columns_only():
    w = weight()
    w[:, :16] *= 100  # far wider ranges in the full groups
    scale, zero = minmax_qparams(w, RAGGED)
    own_scale, own_zero = minmax_qparams(w[:, 16:], QuantSpec(4))  # the last 4 columns alone, one group
    assert torch.equal(scale[:, 2:], own_scale) and torch.equal(zero[:, 2:], own_zero)
    assert torch.equal(scale[:, :2], minmax_qparams(w[:, :16], QuantSpec(4, False, 8))[0])
    assert torch.equal(expand_groups(torch.arange(3.0).expand(2, 3), 20, 8)[0],
                       torch.tensor([0.0] * 8 + [1.0] * 8 + [2.0] * 4))
    with pytest.raises(ValueError, match="3 groups do not fit 20 columns with group size 6"):
        expand_groups(scale, 20, 6)


def test_ragged_changes_nothing_where_the_group_size_divides():
    w, H = weight(cols=24), torch.eye(24) + 0.1
    plain, ragged = QuantSpec(3, False, 8), QuantSpec(3, False, 8, ragged=True)
    for a, b in zip(rtn_layer(w, plain, clip_search=True), rtn_layer(w, ragged, clip_search=True)):
        assert torch.equal(a, b)
    for a, b in zip(gptq_layer(w, H, plain, blocksize=5), gptq_layer(w, H, ragged, blocksize=5)):
        assert torch.equal(a, b)


def test_rtn_clip_search_on_a_ragged_last_group():
    spec = QuantSpec(2, False, 16, ragged=True)
    w = weight(cols=28)  # groups of 16 and 12
    w[:, 26] *= 8  # an outlier in the last group
    clip = search_clip(w, spec)
    assert clip.shape == (6, 2) and (clip[:, 1] < 1).any()
    err = lambda q: (dequantize(*q, group_size=16) - w)[:, 16:].pow(2).sum(1)
    assert torch.all(err(rtn_layer(w, spec, clip_search=True)) <= err(rtn_layer(w, spec)) + 1e-6)


def test_cbq_linear_on_a_ragged_grid_starts_at_round_to_nearest():
    linear = torch.nn.Linear(20, 6)
    with torch.no_grad():
        linear.weight.copy_(weight() * 0.1)
    layer = CBQLinear(linear, RAGGED, None, rank=0)  # full AdaRound V at V0: hardens to round to nearest
    scale, zero = minmax_qparams(linear.weight, RAGGED)
    rtn = quantize(linear.weight, scale, zero, RAGGED)
    assert layer.scale0.shape == (6, 3) and (layer.codes() == rtn).float().mean() > 0.99  # but at exact x.5 ties
    layer.mode = "soft"
    (layer(torch.randn(3, 20)) ** 2).sum().backward()
    assert layer.log_gain.grad.shape == (6, 3) and torch.all(layer.log_gain.grad[:, 2] != 0)
    layer.mode = "hard"
    entry = layer.entry()
    hard = dequantize(entry["codes"], entry["scale"], entry["zero"], group_size=8)
    assert torch.equal(layer.quantized_weight(), hard)


# -- the plugins through run() ------------------------------------------------------------------------------

def ragged_args(plugin: str) -> list[str]:
    """Groups of 24 on the tiny Llama (widths 32 = 24 + 8 and 64 = 2·24 + 16), the formats that can hold them."""
    tiny = ["plugin.cbq.calibration.batch_size=4", "plugin.cbq.epochs=1"] if plugin == "cbq" else []
    return [f"plugin.{plugin}.group_size=24", f"plugin.{plugin}.group_remainder=ragged",
            f"plugin.{plugin}.calibration.samples=8", f"plugin.{plugin}.export_formats=[dequantized,native]", *tiny]


@pytest.mark.parametrize("plugin", ["rtn", "gptq", "cbq"])
def test_each_quantizer_runs_a_ragged_grid_end_to_end(plugin, llama_dir, corpus, tmp_path):
    run(load_config(llm_args(f"{plugin}_llm", llama_dir, corpus, tmp_path / "run", *ragged_args(plugin))))
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "finished" and metrics["metrics"]["val/ppl"] > 1
    out = tmp_path / "run" / "export" / plugin
    native = load_file(str(out / "native" / "model.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(out / "dequantized").state_dict()
    original = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    names = [k.removesuffix(".codes") for k in native if k.endswith(".codes")]
    assert len(names) == 14
    for name in names:
        codes, scale, zero = (native[f"{name}.{part}"] for part in ("codes", "scale", "zero"))
        width = codes.shape[1]
        assert scale.shape == (codes.shape[0], -(-width // 24)) and width % 24
        assert torch.equal(plain[f"{name}.weight"], dequantize(codes, scale, zero, group_size=24))
        if plugin == "rtn":  # data-free: the last group's range is that of the original weight's last columns
            w = original[f"{name}.weight"]
            assert torch.equal(scale[:, -1:], minmax_qparams(w[:, (width // 24) * 24:], QuantSpec(4))[0])
    if plugin == "rtn":  # the native export reloads (init_from) into QuantLinears of ⌈in/g⌉ groups
        args = llm_args("rtn_llm", llama_dir, corpus, tmp_path / "reload", *ragged_args(plugin), "stages=[evaluate]",
                        f"init_from={out / 'native' / 'model.safetensors'}")
        run(load_config(args))
        assert read_metrics(tmp_path / "reload")["metrics"]["val/ppl"] == metrics["metrics"]["val/ppl"]
    bits = metrics["metrics"][f"{plugin}/bits_per_weight"]
    groups = {32: 2, 64: 3}  # scales + 4-bit zero points per row: ⌈32/24⌉ and ⌈64/24⌉
    per_row = {n: native[f"{n}.codes"].shape for n in names}
    extra = sum(r * groups[c] * (16 + 4) for r, c in per_row.values()) / sum(r * c for r, c in per_row.values())
    assert bits == pytest.approx(4 + extra)
