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


def obs_reference(W: torch.Tensor, H: torch.Tensor, density: float, nm: tuple[int, int] | None, blocksize: int,
                  damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT written the plain way, in float64, one column at a time (no Cholesky factor, no lazy updates).

    Columns are processed left to right; when column c is reached, the columns c.. are still free, so OBS uses
    Hc = inv(Hd[c:, c:]) (Hd: H damped by damp·mean(diag H)). Masks: at the start of each block of ``blocksize``
    columns, the block's weights with the smallest w_j² / inv(Hd[j:, j:])[0, 0], as many as keep the layer's
    pruned count at round-exact density up to the block's end; for N:M, at every M-th column, the M−N smallest
    of each row's next M. A pruned w_c is removed by the OBS step W[:, c:] −= (w_c / Hc[0, 0]) ⊗ Hc[0, :].
    """
    W, H = W.double().clone(), H.double()
    rows, cols = W.shape
    Hd = H + damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    inverses = [torch.linalg.inv(Hd[c:, c:]) for c in range(cols)]
    diag = torch.tensor([inv[0, 0] for inv in inverses], dtype=torch.float64)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)

    def pruned_up_to(c: int) -> int:  # how many of the first c columns' weights are pruned
        return rows * c - round(rows * c * density)

    for c in range(cols):
        if nm is None and c % blocksize == 0:
            end = min(c + blocksize, cols)
            saliency = (W[:, c:end] ** 2 / diag[c:end]).flatten()
            block = torch.zeros(rows * (end - c), dtype=torch.bool)
            block[saliency.argsort()[:pruned_up_to(end) - pruned_up_to(c)]] = True
            pruned[:, c:end] = block.view(rows, end - c)
        if nm is not None and c % nm[1] == 0:
            saliency = W[:, c:c + nm[1]] ** 2 / diag[c:c + nm[1]]
            pruned[:, c:c + nm[1]].scatter_(1, saliency.argsort(dim=1)[:, :nm[1] - nm[0]], True)
        err = torch.where(pruned[:, c], W[:, c], 0.0) / inverses[c][0, 0]
        W[:, c:] -= err[:, None] * inverses[c][0][None, :]
    W[pruned] = 0
    return W, ~pruned


@pytest.mark.parametrize("pattern,nm,density", [("layer", None, 0.5), ("layer", None, 0.3), ("2:4", (2, 4), 0.5),
                                                 ("4:8", (4, 8), 0.5)])
def test_sparsegpt_matches_a_column_by_column_obs_reference(pattern, nm, density):
    rows, cols, blocksize = 24, 64, 16  # 4 blocks: the lazy update carries each block's error to the next
    x = correlated_inputs(512, cols, seed=3)
    acc = HessianAccumulator(cols)
    acc.add(x)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(5))
    got, keep = sparsegpt_layer(w, acc.H, density=density, pattern=pattern, blocksize=blocksize, damp=0.01)
    want, want_keep = obs_reference(w, acc.H, density, nm, blocksize, damp=0.01)
    assert torch.equal(keep, want_keep)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4), float((got.double() - want).abs().max())
    assert not torch.allclose(got.double(), w.double() * keep, atol=1e-2)  # the kept weights were updated


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
