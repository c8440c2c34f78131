"""``block_sparse_linear`` on its CPU paths (compiled loop and torch BSR reference) equals the masked dense linear
(forward and gradients, square and non-square blocks, fp32 and bf16, odd token counts, strided inputs); without a
compiler it falls back to the reference; a block-sparse model saves, reloads and runs it."""
from __future__ import annotations

import shutil

import pytest
import torch

from blocktrain.kernels import _block_sparse_linear_c, dispatch
from blocktrain.kernels.block_sparse_linear import block_sparse_linear, from_bsr, to_bsr
from blocktrain.trainer.compression.block_sparse import (BlockSparseLinear, load_block_sparse, save_block_sparse,
                                                         to_block_sparse)
from tests.pruning.conftest import tiny_llama, token_batches


def block_pruned(out, inp, block, gen, density=0.5):
    keep = torch.rand(out // block[0], inp // block[1], generator=gen) < density
    return torch.randn(out, inp, generator=gen) * keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """The compiled loop's loader as on a new machine: empty cache, nothing built or tried yet."""
    monkeypatch.setenv("BLOCKTRAIN_CACHE", str(tmp_path))
    _block_sparse_linear_c._library.cache_clear()
    yield tmp_path
    _block_sparse_linear_c._library.cache_clear()


def needs_compiler(backend):
    if backend == "compiled" and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("block,dtype", [((16, 16), torch.float32), ((32, 32), torch.float32),
                                         ((16, 32), torch.float32), ((32, 64), torch.float32),
                                         ((32, 32), torch.bfloat16), ((8, 8), torch.bfloat16)])
def test_matches_the_masked_dense_linear_forward_and_backward(block, dtype, backend):
    needs_compiler(backend)
    dispatch.set_backend(backend)  # 8x8 blocks run the reference under "compiled" too
    gen = torch.Generator().manual_seed(0)
    weight = block_pruned(64, 128, block, gen)
    values, crow, col = to_bsr(weight, block)
    assert torch.equal(from_bsr(values, crow, col, weight.shape), weight)
    assert values.shape[0] == int(weight.reshape(64 // block[0], block[0], 128 // block[1], block[1]).ne(0)
                                  .any(3).any(1).sum())
    x = torch.randn(3, 7, 128, generator=gen).to(dtype).requires_grad_(True)
    bias = torch.randn(64, generator=gen).to(dtype).requires_grad_(True)
    values = values.to(dtype).requires_grad_(True)
    dense = weight.to(dtype).requires_grad_(True)
    y = block_sparse_linear(x, values, crow, col, bias)
    y_ref = x @ dense.t() + bias
    assert y.dtype == dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, [x, values, bias], g)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, [x, dense, bias], g)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gb, gb_ref, **tol)
    stored = from_bsr(torch.ones_like(values), crow, col, weight.shape).bool()
    torch.testing.assert_close(from_bsr(gv, crow, col, weight.shape), gw_ref * stored, **tol)


@pytest.mark.parametrize("tokens,block,bias", [(1, (16, 16), True), (25, (32, 32), False), (61, (32, 64), True),
                                               (13, (16, 32), False)])
def test_compiled_loop_on_odd_token_counts_strided_inputs_and_empty_block_rows(tokens, block, bias):
    needs_compiler("compiled")
    gen = torch.Generator().manual_seed(tokens)
    weight = block_pruned(96, 192, block, gen)
    weight[: block[0]] = 0  # a block row with no stored block: its outputs are the bias alone
    values, crow, col = to_bsr(weight, block)
    x = torch.randn(tokens, 2 * 192, generator=gen)[:, ::2].requires_grad_(True)  # not contiguous
    b = torch.randn(96, generator=gen).requires_grad_(True) if bias else None
    values.requires_grad_(True)
    dense = weight.clone().requires_grad_(True)
    with dispatch.use_backend("compiled"):
        y = block_sparse_linear(x, values, crow, col, b)
    y_ref = torch.nn.functional.linear(x, dense, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, values], g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, [x, dense], g)
    torch.testing.assert_close(grads[0], gx_ref, rtol=1e-5, atol=1e-5)
    stored = from_bsr(torch.ones_like(values), crow, col, weight.shape)
    torch.testing.assert_close(from_bsr(grads[1], crow, col, weight.shape), gw_ref * stored, rtol=1e-5, atol=1e-5)


def test_auto_runs_the_compiled_loop_on_cpu_and_the_reference_without_a_compiler(fresh_cache, monkeypatch):
    needs_compiler("compiled")
    gen = torch.Generator().manual_seed(1)
    weight = block_pruned(32, 64, (16, 16), gen)
    x = torch.randn(5, 64, generator=gen)
    values, crow, col = to_bsr(weight, (16, 16))
    calls = []
    monkeypatch.setattr(_block_sparse_linear_c, "forward", lambda *a: calls.append(1) or torch.zeros(5, 32))
    block_sparse_linear(x, values, crow, col)
    assert calls and list((fresh_cache / "kernels").glob("block_sparse_linear_*.so"))
    _block_sparse_linear_c._library.cache_clear()
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails; the cache is new
    monkeypatch.setenv("BLOCKTRAIN_CACHE", str(fresh_cache / "other"))
    with pytest.warns(UserWarning, match="could not build the CPU block-sparse linear .*false failed"):
        y = block_sparse_linear(x, values, crow, col)
    assert len(calls) == 1
    torch.testing.assert_close(y, x @ weight.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="'compiled' kernel backend is forced"):
        with dispatch.use_backend("compiled"):
            block_sparse_linear(x, values, crow, col)


def test_a_block_that_does_not_tile_is_refused():
    with pytest.raises(ValueError, match="block 16x16 does not tile a 40x32 weight"):
        to_bsr(torch.zeros(40, 32), (16, 16))


def test_block_sparse_model_saves_reloads_and_matches(tmp_path):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(m.weight * (block_pruned(*m.weight.shape, (16, 16), gen) != 0))
    batch = token_batches(1)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    with_zero_blocks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
                        and to_bsr(m.weight, (16, 16))[0].shape[0] < m.weight.numel() // 256}
    manifest = to_block_sparse(model, (16, 16))
    assert set(manifest) == with_zero_blocks and len(manifest) >= 8  # lm_head is tied to the embedding: stays
    assert isinstance(model.model.layers[0].mlp.up_proj, BlockSparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    save_block_sparse(model, manifest, tmp_path / "bsr")
    fresh = load_block_sparse(tiny_llama(seed=9), tmp_path / "bsr")
    assert isinstance(fresh.model.layers[1].self_attn.q_proj, BlockSparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_fixed_mask_training_through_block_sparse_linear_matches_the_masked_dense_steps():
    from blocktrain.trainer.compression.block_sparse import BlockMaskedLinear, run_block_sparse, run_dense
    from blocktrain.trainer.compression.fixed_masks import attach_masks, mask_optimizer

    gen = torch.Generator().manual_seed(5)
    models = [tiny_llama(), tiny_llama()]
    masks = {n: block_pruned(*m.weight.shape, (16, 16), gen) != 0 for n, m in models[0].named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    masks["model.layers.0.mlp.up_proj"][:] = True  # keeps every block: stays a plain Linear
    batches = token_batches(2)
    for model in models:
        attach_masks(model, masks)
    keys = list(models[1].state_dict())
    swapped = run_block_sparse(models[1], (16, 16))
    assert set(swapped) == {n for n, keep in masks.items() if not keep.all()} and len(swapped) >= 8
    assert "model.layers.0.mlp.up_proj" not in swapped
    assert isinstance(models[1].model.layers[1].self_attn.o_proj, BlockMaskedLinear)
    assert list(models[1].state_dict()) == keys
    for model in models:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mask_optimizer(model, opt)
        for batch in batches:
            opt.zero_grad()
            model(**batch, labels=batch["input_ids"]).loss.backward()
            opt.step()
    run_dense(models[1])
    assert type(models[1].model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert not hasattr(models[1].model.layers[1].self_attn.o_proj, "bsr_col")
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not models[1].model.layers[1].self_attn.o_proj.weight[~masks["model.layers.1.self_attn.o_proj"]].any()
