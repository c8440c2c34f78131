"""Block-LoRA core: the two readings' math (forward, gradients, dropout position, merge) and split attention."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.plugins.blocklora import (SplitMultiheadAttention, SumRankVariant, apply_block_lora, block_lora_layer,
                                          block_lora_layers, fused_state_dict, merge_lora, save_merged,
                                          split_multihead_attention, unmerge_lora)
from blocktrain.trainer.errors import UserError

IN, OUT = 24, 10


def base_linear(bias=True):
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=bias)


def make(mode, rank, n_blocks, dropout=0.0, dropout_position="before_sum", scaling="sqrt_rank", bias=True):
    layer = block_lora_layer(base_linear(bias), mode, rank, 3.0, dropout, scaling, n_blocks, dropout_position)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero, which would hide every error in the update
    return layer


def run(layer, x, grad_out, seed=7):
    """Output and the gradients of x, A and B for <layer(x), grad_out> (dropout seeded by ``seed``)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    torch.manual_seed(seed)
    y = layer(x)
    (y * grad_out).sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def tile_delta(a, b, n_blocks):
    """Reading A's ΔW = B·[A_s, …, A_s] (n copies along the input axis), built from the definition."""
    return b @ torch.cat([a] * n_blocks, dim=1)


def sum_rank_delta(a, b, n_blocks):
    """Reading B's ΔW = Σ_i B_i·A_s with B_i the i-th block of r/n columns of B."""
    return sum(block @ a for block in b.split(b.shape[1] // n_blocks, dim=1))


def layer_delta(layer):
    delta = tile_delta if layer.variant.mode == "tile_input" else sum_rank_delta
    return delta(layer.lora_A.detach(), layer.lora_B.detach(), layer.n_blocks)


def dense_reference(x, layer, a, b, keep=None, tile=None):
    """The spec's Block-LoRA written densely, without the layer's code: y = x·Wᵀ + b + s·x̃·ΔWᵀ with
    x̃ = keep ⊙ x / (1 − p) (dropout on the adapter input, before the chunk-sum) and ΔW = B·tile(A_s, n),
    n copies of A_s side by side along the input axis (Reading A), or ΔW = Σ_i B_i·A_s (Reading B).
    n = 1 is LoRA (Hu et al.): y = x·Wᵀ + b + s·x̃·(B·A)ᵀ."""
    n = layer.n_blocks
    if layer.variant.mode == "sum_rank":
        delta = sum_rank_delta(a, b, n)
    else:
        delta = b @ (torch.cat([a] * n, dim=1) if tile is None else tile(a, n))
    dropped = x if keep is None else x * keep / (1.0 - layer.dropout)
    return x @ layer.weight.T + layer.bias + layer.scaling * dropped @ delta.T


def run_with_mask(layer, x, grad_out, monkeypatch):
    """``run`` plus the dropout keep-mask the layer drew (None without dropout), rebuilt from its seed."""
    import importlib

    op = importlib.import_module("blocktrain.kernels.lora_linear")
    seeds = []
    seeded = op.lora_linear_seeded
    monkeypatch.setattr(op, "lora_linear_seeded", lambda *args: seeds.append(args[-1]) or seeded(*args))
    result = run(layer, x, grad_out)
    if layer.dropout == 0.0:
        return result, None
    keep = op.dropout_keep_mask(int(seeds[-1]), x[..., 0].numel(), x.shape[-1], layer.dropout)
    return result, keep.view(x.shape).float()


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("mode, rank, n_blocks", [
    ("tile_input", 3, 1), ("tile_input", 2, 2), ("tile_input", 3, 3), ("tile_input", 2, 8),
    ("sum_rank", 4, 1), ("sum_rank", 4, 2), ("sum_rank", 4, 4)])
def test_outputs_and_gradients_equal_the_dense_formula(mode, rank, n_blocks, dropout, monkeypatch):
    """For every n, n = 1 (LoRA) included: the layer against the dense formula, with its dropout mask."""
    layer = make(mode, rank, n_blocks, dropout).train()
    x, g = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    (y, gx, ga, gb), keep = run_with_mask(layer, x, g, monkeypatch)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    want = dense_reference(xr, layer, a, b, keep)
    (want * g).sum().backward()
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in ((gx, xr.grad), (ga, a.grad), (gb, b.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if dropout:
        assert 0 < keep.mean() < 1  # a real mask: some inputs dropped, some kept


def test_the_dense_formula_tells_a_wrong_tiling_or_dropout_from_the_right_one(monkeypatch):
    """The check above would catch a layer that tiles A_s wrongly or drops the wrong thing."""
    layer = make("tile_input", 2, 4, dropout=0.25).train()
    x, g = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    (y, *_), keep = run_with_mask(layer, x, g, monkeypatch)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(y, dense_reference(x, layer, a, b, keep), rtol=1e-5, atol=1e-5)
    interleaved = dense_reference(x, layer, a, b, keep, tile=lambda a, n: a.repeat_interleave(n, 1))
    first_chunk_only = dense_reference(x, layer, a, b, keep, tile=lambda a, n: F.pad(a, (0, a.shape[1] * (n - 1))))
    wrong = {"each column of A_s repeated n times": interleaved, "A_s on the first chunk only": first_chunk_only,
             "no dropout": dense_reference(x, layer, a, b), "another mask": dense_reference(x, layer, a, b, keep.flip(0))}
    for what, other in wrong.items():
        assert not torch.allclose(y, other, rtol=1e-3, atol=1e-3), what


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode, rank, n_blocks, delta", [
    ("tile_input", 2, 8, tile_delta), ("tile_input", 3, 4, tile_delta),
    ("sum_rank", 8, 4, sum_rank_delta), ("sum_rank", 6, 3, sum_rank_delta)])
def test_forward_and_gradients_equal_the_definition(mode, rank, n_blocks, delta, bias):
    layer = make(mode, rank, n_blocks, bias=bias).train()
    a_shape = (rank, IN // n_blocks) if mode == "tile_input" else (rank // n_blocks, IN)
    assert tuple(layer.lora_A.shape) == a_shape and tuple(layer.lora_B.shape) == (OUT, rank)
    assert layer.lora_A.numel() + layer.lora_B.numel() == OUT * rank + rank * IN // n_blocks
    x, g = torch.randn(2, 3, IN), torch.randn(2, 3, OUT)
    y, gx, ga, gb = run(layer, x, g)

    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    want = F.linear(xr, layer.weight + layer.scaling * delta(a, b, n_blocks), layer.bias)
    (want * g).sum().backward()
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in ((gx, xr.grad), (ga, a.grad), (gb, b.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_update_is_zero_at_init_and_scaling_follows_the_nominal_rank():
    for mode, rank, n in (("tile_input", 2, 8), ("sum_rank", 8, 8)):
        layer = block_lora_layer(base_linear(), mode, rank, 1.0, 0.0, "sqrt_rank", n)
        x = torch.randn(4, IN)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
        assert layer.scaling == pytest.approx(1.0 / rank ** 0.5)
        assert block_lora_layer(base_linear(), mode, rank, 1.0, 0.0, "rank", n).scaling == pytest.approx(1.0 / rank)


def test_sum_rank_blocks_get_identical_gradients_from_zero_init():
    """Spec §4: with B_i = 0 at start all rank-blocks see the same gradient (Reading B degenerates)."""
    layer = block_lora_layer(base_linear(), "sum_rank", 8, 1.0, 0.0, "sqrt_rank", 4).train()
    layer(torch.randn(5, IN)).pow(2).sum().backward()
    blocks = layer.lora_B.grad.split(2, dim=1)
    assert blocks[0].abs().sum() > 0
    for block in blocks[1:]:
        torch.testing.assert_close(block, blocks[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode, rank, n_blocks", [("tile_input", 2, 8), ("sum_rank", 8, 4)])
def test_merged_equals_unmerged_and_unmerge_restores_the_weight(mode, rank, n_blocks):
    layer = make(mode, rank, n_blocks, dropout=0.25).eval()
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 4, IN)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.scaling * layer_delta(layer), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_after_sum_drops_the_chunk_sum():
    layer = make("tile_input", 2, 4, dropout=0.5, dropout_position="after_sum").train()
    x, g = torch.randn(6, IN), torch.randn(6, OUT)
    y, gx, ga, gb = run(layer, x, g, seed=3)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(3)  # the same draw: one (rows, in/n) mask on Σ_j x_j
    xs = F.dropout(xr.view(6, 4, IN // 4).sum(1), 0.5, training=True)
    want = F.linear(xr, layer.weight, layer.bias) + layer.scaling * (xs @ a.T) @ b.T
    (want * g).sum().backward()
    torch.testing.assert_close(y, want.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in ((gx, xr.grad), (ga, a.grad), (gb, b.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # without dropout (eval) both positions are the same function
    before = make("tile_input", 2, 4, dropout=0.5).eval()
    torch.testing.assert_close(layer.eval()(x), before(x), rtol=0, atol=0)
    assert "dropout_position=after_sum" in repr(layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode, rank, n_blocks, position", [
    ("tile_input", 2, 8, "before_sum"), ("tile_input", 2, 8, "after_sum"), ("sum_rank", 8, 4, "before_sum")])
def test_cuda_matches_cpu(mode, rank, n_blocks, position):
    layer = make(mode, rank, n_blocks, dropout_position=position).train()
    on_cuda = copy.deepcopy(layer).cuda()
    x, g = torch.randn(4, 9, IN), torch.randn(4, 9, OUT)
    for got, want in zip(run(on_cuda, x.cuda(), g.cuda()), run(layer, x, g)):
        torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)


def test_argument_errors_are_clear():
    with pytest.raises(UserError, match=r"n_blocks must divide rank: rank=2, n_blocks=8"):
        block_lora_layer(base_linear(), "sum_rank", 2, 1.0, n_blocks=8)
    with pytest.raises(UserError, match="mode sum_rank has no input chunk-sum"):
        block_lora_layer(base_linear(), "sum_rank", 8, 1.0, n_blocks=8, dropout_position="after_sum")
    with pytest.raises(UserError, match="unknown Block-LoRA mode 'tile'. Valid values: tile_input, sum_rank"):
        block_lora_layer(base_linear(), "tile", 2, 1.0)
    with pytest.raises(UserError, match="unknown Block-LoRA dropout_position 'middle'"):
        block_lora_layer(base_linear(), "tile_input", 2, 1.0, dropout_position="middle")
    with pytest.raises(UserError, match="in_features 24 is not divisible by n_blocks 5"):
        block_lora_layer(base_linear(), "tile_input", 2, 1.0, n_blocks=5)
    assert isinstance(block_lora_layer(base_linear(), "sum_rank", 4, 1.0, n_blocks=2).variant, SumRankVariant)


# -- nn.MultiheadAttention split into q/k/v Linear layers (open_clip, OpenAI CLIP) ------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, 12])
def test_split_attention_computes_the_same_attention(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    split = SplitMultiheadAttention(mha)
    assert {n for n, m in split.named_modules() if isinstance(m, nn.Linear)} == {"q_proj", "k_proj", "v_proj",
                                                                                  "out_proj"}
    n, length, source, width = 3, 5, 7, kdim or 16
    q = torch.randn(n, length, 16) if batch_first else torch.randn(length, n, 16)
    kv = torch.randn(n, source, width) if batch_first else torch.randn(source, n, width)
    causal = torch.ones(length, source, dtype=torch.bool).triu(1)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -2:] = True
    float_mask = torch.randn(n * 4, length, source)
    for kwargs in ({}, {"attn_mask": causal}, {"attn_mask": float_mask}, {"key_padding_mask": padding},
                   {"attn_mask": causal, "key_padding_mask": padding}, {"average_attn_weights": False}):
        for need_weights in (False, True):
            want, want_w = mha(q, kv, kv, need_weights=need_weights, **kwargs)
            got, got_w = split(q, kv, kv, need_weights=need_weights, **kwargs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
            else:
                assert got_w is None
    unbatched = q[:, 0] if batch_first is False else q[0]
    kv1 = kv[:, 0] if batch_first is False else kv[0]
    torch.testing.assert_close(split(unbatched, kv1, kv1)[0], mha(unbatched, kv1, kv1)[0], rtol=1e-5, atol=1e-5)


class ToyAttentionModel(nn.Module):
    """Two residual self-attention blocks on nn.MultiheadAttention (the open_clip layout, L N D)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.resblocks = nn.ModuleList(nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2)}) for _ in range(2))

    def forward(self, x):
        for block in self.resblocks:
            x = x + block["attn"](x, x, x, need_weights=False)[0]
        return x


def test_split_attention_adapts_and_merges_back_into_the_fused_layout(tmp_path):
    from safetensors.torch import load_file

    plain = ToyAttentionModel().eval()
    x = torch.randn(5, 2, 16)
    with pytest.raises(UserError, match="uses its out_proj weight without calling the layer"):
        apply_block_lora(copy.deepcopy(plain), targets=["out_proj"], n_blocks=4)
    model = apply_block_lora(copy.deepcopy(plain), targets=["q_proj", "v_proj", "out_proj"], n_blocks=4,
                             split_attention=True).eval()
    assert sorted(block_lora_layers(model)) == [f"resblocks.{i}.attn.{p}" for i in (0, 1)
                                                for p in ("out_proj", "q_proj", "v_proj")]
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)  # B = 0: the same function
    with torch.no_grad():
        for layer in block_lora_layers(model).values():
            layer.lora_B.normal_(std=0.2)
    y = model(x)
    assert not torch.allclose(y, plain(x), atol=1e-3)
    assert save_merged(model, tmp_path) == [tmp_path / "model.safetensors"]
    merged = copy.deepcopy(plain)
    merged.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict: the plain model's keys
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    state = fused_state_dict(model, merge_lora(model).state_dict())
    merged.load_state_dict({k: v for k, v in state.items() if ".lora_" not in k})
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="resblocks.0 is not an nn.MultiheadAttention"):
        split_multihead_attention(ToyAttentionModel(), ["resblocks.0"])
