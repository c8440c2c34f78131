"""SparseGPT and its reusable Hessian helpers."""
from __future__ import annotations

import pytest
import torch

from blocktrain.plugins.sparsity import sparsegpt_layer, sparsegpt_prune
from blocktrain.trainer.compression.hessian import HessianAccumulator, cholesky_inverse_upper
from blocktrain.trainer.compression.masks import find_linear_names, mask_from_scores, sparsity_report

from .conftest import tiny_llama, token_batches


def correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features of very different scales (where OBS updates pay off)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features ** 0.5
    scale = torch.rand(features, generator=gen) * 3 + 0.1
    return (torch.randn(n, features, generator=gen) @ mix + 0.5 * torch.randn(n, features, generator=gen)) * scale


def test_running_hessian_equals_the_batch_formula():
    x = torch.randn(3, 50, 24, dtype=torch.float64)
    acc = HessianAccumulator(24, dtype=torch.float64)
    for chunk in x.split([1, 2], dim=0):
        acc.add(chunk)
    flat = x.reshape(-1, 24)
    assert acc.n == 150
    assert torch.allclose(acc.H, 2 * flat.T @ flat / 150)
    again = HessianAccumulator(24, dtype=torch.float64)
    again.load_state_dict(acc.state_dict())
    again.add(flat[:10])
    acc.add(flat[:10])
    assert torch.equal(again.H, acc.H)


def test_cholesky_inverse_upper_factors_the_damped_inverse():
    x = correlated_inputs(200, 16)
    acc = HessianAccumulator(16)
    acc.add(x)
    H = acc.H.clone()
    H[:, 3] = H[3, :] = 0  # a dead input
    U = cholesky_inverse_upper(H, damp=0.05)
    assert torch.equal(U, torch.triu(U))
    damped = H.double().clone()
    damped[3, 3] = 1
    damped += 0.05 * damped.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.allclose((U.T @ U).double(), torch.linalg.inv(damped), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("pattern,wanda_pattern", [("layer", "row"), ("layer", "layer"), ("2:4", "2:4")])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern, wanda_pattern):
    rows, cols = 48, 64
    x = correlated_inputs(1024, cols)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(100))
    acc = HessianAccumulator(cols)
    for chunk in x.split(100):
        acc.add(chunk)
    pruned, keep = sparsegpt_layer(w, acc.H, density=0.5, pattern=pattern, blocksize=16)

    def error(w_hat):
        return float(((w - w_hat) @ x.T).norm())

    magnitude = w * mask_from_scores(w.abs(), 0.5, "layer" if pattern == "layer" else pattern)
    wanda = w * mask_from_scores(w.abs() * x.pow(2).sum(0).sqrt(), 0.5, wanda_pattern)
    assert int(keep.sum()) == rows * cols // 2 and torch.equal(pruned != 0, keep)
    assert error(pruned) < error(wanda) and error(pruned) < error(magnitude)
    if pattern == "2:4":
        assert (keep.reshape(rows, -1, 4).sum(-1) == 2).all()


def test_sparsegpt_prune_on_a_model_keeps_exact_densities():
    model = tiny_llama()
    masks = sparsegpt_prune(model, token_batches(3), density=0.5, blocksize=16)
    assert set(sparsity_report(model).values()) == {0.5}
    model = tiny_llama()
    masks = sparsegpt_prune(model, token_batches(3), pattern="4:8", blocksize=16)
    for name in find_linear_names(model):
        w = model.get_submodule(name).weight
        assert torch.equal(w != 0, masks[name])
        assert ((w != 0).reshape(w.shape[0], -1, 8).sum(-1) == 4).all()
