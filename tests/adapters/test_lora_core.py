"""The adapter library's LoRA layer and surgery: the layer's math (forward, gradient, dropout, merge), with the plain
variant and Block-LoRA's tile_input variant (n_blocks input chunks), and model surgery on real model classes."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.plugins.blocklora import TileInputVariant
from blocktrain.trainer.adapters import (LoraLinear, LoraVariant, apply_lora, count_parameters, lora_layers,
                                         lora_scaling, lora_state_dict, merge_lora, select_linears, unmerge_lora)
from blocktrain.trainer.errors import UserError

from .builders import tiny_bert, tiny_llama, tiny_vit


def randomize_lora(model, seed=1):
    """Non-zero B (it starts at zero, which would hide every error in the update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def make_layer(in_f=12, out_f=7, rank=3, alpha=5.0, scaling="rank", n_blocks=1, dropout=0.0, bias=True):
    torch.manual_seed(0)
    variant = TileInputVariant(n_blocks) if n_blocks > 1 else None
    layer = LoraLinear(nn.Linear(in_f, out_f, bias=bias), rank, alpha, dropout, scaling, variant)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def hand_lora(x, w, b, a, bb, s, n):
    """y = x Wᵀ + b + s ((Σ_j x_j) Aᵀ) Bᵀ with x split into n chunks along the last axis."""
    xs = x.reshape(*x.shape[:-1], n, x.shape[-1] // n).sum(-2)
    y = x @ w.T + s * (xs @ a.T) @ bb.T
    return y if b is None else y + b


@pytest.mark.parametrize("scaling", ["rank", "sqrt_rank"])
def test_scaling_values(scaling):
    layer = make_layer(rank=4, alpha=6.0, scaling=scaling)
    assert layer.scaling == pytest.approx(6.0 / 4 if scaling == "rank" else 6.0 / 2)
    assert lora_scaling(6.0, 4, scaling) == layer.scaling


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scaling", ["rank", "sqrt_rank"])
def test_forward_and_gradient_equal_hand_written_lora(scaling, bias):
    layer = make_layer(scaling=scaling, bias=bias).train()
    x = torch.randn(2, 5, 12, requires_grad=True)
    grad_out = torch.randn(2, 5, 7)
    (layer(x) * grad_out).sum().backward()
    a = layer.lora_A.detach().clone().requires_grad_(True)
    bb = layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = hand_lora(x2, layer.weight, layer.bias, a, bb, layer.scaling, 1)
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, bb.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_block_lora_forward_is_chunk_sum_and_merges_to_tiled_a():
    layer = make_layer(in_f=12, n_blocks=4, rank=2).eval()
    assert layer.lora_A.shape == (2, 3)
    x = torch.randn(6, 12)
    y = layer(x)
    torch.testing.assert_close(y, hand_lora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, 4))
    tiled = torch.cat([layer.lora_A] * 4, dim=1)
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * layer.lora_B @ tiled)
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.weight, w0 + layer.scaling * layer.lora_B @ tiled)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_init_kaiming_a_zero_b_and_zero_update():
    base = nn.Linear(50, 9)
    layer = LoraLinear(base, rank=16, alpha=8.0)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(50)  # kaiming_uniform_(a=sqrt(5)) on fan_in 50
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    x = torch.randn(4, 50)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.training and not LoraLinear(base.eval(), rank=2, alpha=1.0).training  # keeps the base's mode


def test_dropout_on_lora_input_only_and_unbiased():
    layer = make_layer(dropout=0.5)
    x = torch.randn(1, 12).expand(20000, 12)
    base = F.linear(x[:1], layer.weight, layer.bias)
    layer.eval()
    y_eval = layer(x[:1])
    layer.train()
    y_train = layer(x)
    assert not torch.allclose(y_train[0], y_train[1])  # a fresh mask per row
    torch.testing.assert_close(y_train.mean(0, keepdim=True) - base, y_eval - base, atol=0.1, rtol=0.05)
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))  # base path never dropped


def test_merge_skips_adapter_and_unmerge_restores_weight():
    layer = make_layer().eval()
    x = torch.randn(3, 12)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.merge()  # idempotent
    assert not torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lora_A.mul_(3)  # after merge the adapter is not used by the forward
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lora_A.div_(3)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def test_layer_argument_errors():
    with pytest.raises(UserError, match="scaling"):
        LoraLinear(nn.Linear(8, 8), 2, 1.0, scaling="sqrt")
    with pytest.raises(UserError, match="rank"):
        LoraLinear(nn.Linear(8, 8), 0, 1.0)
    with pytest.raises(UserError, match="dropout"):
        LoraLinear(nn.Linear(8, 8), 2, 1.0, dropout=1.0)
    with pytest.raises(UserError, match="in_features 8 is not divisible by n_blocks 3"):
        LoraLinear(nn.Linear(8, 8), 2, 1.0, variant=TileInputVariant(3))


BERT_QV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def test_targets_by_names_and_by_regex_choose_the_same_layers():
    model = tiny_bert()
    assert select_linears(model, ["query", "value"]) == BERT_QV
    assert select_linears(model, r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)") == BERT_QV
    assert select_linears(model, ["self.query", "value"]) == BERT_QV
    with pytest.raises(UserError, match="matches no nn.Linear"):
        select_linears(model, "query")  # a regex matches the full name only
    assert select_linears(model, ["attention.output.dense"]) == [
        f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]


def test_bert_surgery_trainable_counts_and_merge():
    model = tiny_bert()
    _, total0 = count_parameters(model)
    ids = torch.randint(0, 100, (2, 7))
    apply_lora(model, targets=["query", "value"], rank=4, alpha=8, modules_to_save=["classifier"])
    assert list(lora_layers(model)) == BERT_QV
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    trainable, total = count_parameters(model)
    assert trainable == 4 * 4 * (32 + 32) + head
    assert total == total0 + 4 * 4 * (32 + 32)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == (
        {f"{n}.lora_{m}" for n in BERT_QV for m in "AB"} | {"classifier.weight", "classifier.bias"})
    assert set(lora_state_dict(model)) == {f"{n}.lora_{m}" for n in BERT_QV for m in "AB"} | {
        "classifier.weight", "classifier.bias"}
    randomize_lora(model)
    y = model(ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, y, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_vit_block_lora_counts_and_merge():
    model = tiny_vit()
    apply_lora(model, targets=["qkv", "proj"], rank=2, alpha=1, scaling="sqrt_rank", variant=TileInputVariant(8))
    layers = lora_layers(model)
    assert len(layers) == 24 and all(not re.search(r"patch_embed", n) for n in layers)  # patch_embed.proj is a Conv2d
    expected = sum(2 * (m.in_features // 8 + m.out_features) for m in layers.values())
    assert count_parameters(model)[0] == expected == 12 * 2 * (24 + 576) + 12 * 2 * (24 + 192)
    randomize_lora(model)
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_llama_surgery_gradients_reach_only_lora():
    model = tiny_llama().train()
    apply_lora(model, targets=r"model\.layers\.\d+\.self_attn\.[qkvo]_proj", rank=2, alpha=4)
    assert len(lora_layers(model)) == 8
    ids = torch.randint(0, 64, (2, 6))
    model(ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in grads if n.endswith("lora_B"))


def test_surgery_errors_are_clear():
    model = tiny_bert()
    with pytest.raises(UserError, match=r"'q_proj' matches no nn.Linear.*Linear layers: .*query"):
        apply_lora(model, targets=["query", "q_proj"])
    with pytest.raises(UserError, match="only non-Linear modules"):
        apply_lora(model, targets=["attention"])
    with pytest.raises(UserError, match="matches no nn.Linear"):
        apply_lora(model, targets=r".*\.q_proj")
    with pytest.raises(UserError, match="not a valid regex"):
        apply_lora(model, targets="query(")
    with pytest.raises(UserError, match=r"bert.encoder.layer.0.intermediate.dense: in_features 32 is not divisible "
                                        r"by n_blocks 3"):
        apply_lora(model, targets=["intermediate.dense"], variant=TileInputVariant(3))
    with pytest.raises(UserError, match="modules_to_save entry 'head'"):
        apply_lora(model, targets=["query"], modules_to_save=["head"])
    with pytest.raises(UserError, match="is in modules_to_save"):
        apply_lora(model, targets=["query", "classifier"], modules_to_save=["classifier"])
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    apply_lora(model, targets=["query"])
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, targets=["value"])
    with pytest.raises(UserError, match="tied weights"):
        apply_lora(tiny_llama(tie=True), targets=["lm_head"])


def test_bf16_layer_and_autocast():
    layer = make_layer(n_blocks=2)
    x = torch.randn(4, 12)
    y32 = layer.eval()(x)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.lora_A.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), y32, rtol=0.05, atol=0.05)
    half.merge()
    torch.testing.assert_close(half(x.bfloat16()).float(), y32, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)


class DoubledVariant(LoraVariant):
    """A toy variant: the update is 2·s·B·A."""

    def forward(self, layer, x):
        return F.linear(x, layer.weight, layer.bias) + 2 * layer.scaling * F.linear(F.linear(x, layer.lora_A),
                                                                                    layer.lora_B)

    def delta_weight(self, layer):
        return 2 * super().delta_weight(layer)

    def extra_repr(self):
        return ", doubled"


def test_the_layer_takes_init_forward_and_merge_from_its_variant():
    plain = make_layer()
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 7), 3, 5.0, variant=DoubledVariant())
    torch.testing.assert_close(layer.lora_A, plain.lora_A)  # the base variant's Kaiming init, same draws
    with torch.no_grad():
        layer.lora_B.copy_(plain.lora_B)
    x = torch.randn(5, 12)
    base = F.linear(x, plain.weight, plain.bias)
    y = layer(x)
    torch.testing.assert_close(y - base, 2 * (plain(x) - base))
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    assert "doubled" in repr(layer) and layer.n_blocks == 1
