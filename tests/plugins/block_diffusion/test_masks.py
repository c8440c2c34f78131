"""Every block-diffusion mask against a dense 2L x 2L mask built by hand from its definition."""
import pytest
import torch

from blocktrain.kernels.block_diffusion_attention import attention_mask, block_diffusion_attention, dense_mask

L = 8


def hand_mask(kind: str, n: int, lp: int) -> torch.Tensor:
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            q_clean, k_clean = q >= n, k >= n
            qi, ki = q % n, k % n
            bq, bk = qi // lp, ki // lp
            if not q_clean and not k_clean:
                m[q, k] = bq == bk  # M_BD
            elif not q_clean and k_clean:
                m[q, k] = bk < bq  # M_OBC
            elif q_clean and k_clean:
                m[q, k] = bk <= bq if kind == "bd3" else ki <= qi  # M_BC | M_CC
    return m


@pytest.mark.parametrize("kind", ["bd3", "context_causal"])
@pytest.mark.parametrize("lp", [1, 2, 4])
def test_mask_equals_hand_built(kind, lp):
    expected = hand_mask(kind, L, lp)
    assert torch.equal(dense_mask(kind, L, lp), expected)
    assert torch.equal(attention_mask(kind, L, lp, "cpu")[0, 0], expected)  # what the model gets on CPU


def test_known_entries():
    m = dense_mask("bd3", L, 4)
    assert m[5, 4] and m[5, 7] and not m[5, 1] and not m[5, 8 + 5]  # noised block 1: its noised block, not its clean copy
    assert m[5, 8 + 3] and not m[1, 8 + 0]  # ... but clean block 0; noised block 0 sees no clean token
    assert m[8 + 1, 8 + 3] and not dense_mask("context_causal", L, 4)[8 + 1, 8 + 3]  # block- vs token-causal


def test_reference_attention_uses_the_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 2 * L, 8), torch.randn(2, 2, 2 * L, 8), torch.randn(2, 2, 2 * L, 8)
    mask = dense_mask("bd3", L, 2)
    out = block_diffusion_attention(q, k, v, mask[None, None])
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2)) / 8 ** 0.5
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path needs CUDA")
@pytest.mark.parametrize("kind", ["bd3", "context_causal"])
def test_flex_matches_reference(kind):
    n = 256
    q, k, v = (torch.randn(2, 4, 2 * n, 64, device="cuda") for _ in range(3))
    flex = block_diffusion_attention(q, k, v, attention_mask(kind, n, 16, "cuda"))
    ref = block_diffusion_attention(q, k, v, dense_mask(kind, n, 16, "cuda")[None, None])
    torch.testing.assert_close(flex, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_flex_cpu_path_matches_reference():
    """FlexAttention's compiled CPU path with the BlockMask built from the same mask functions (tile 128, blocks
    of 4 and 8: the tile is a sparsity unit, not the diffusion block) equals SDPA with the dense mask."""
    from blocktrain.kernels.block_diffusion_attention import _block_mask

    torch.manual_seed(0)
    n = 64
    q, k, v = torch.randn(2, 4, 2 * n, 16), torch.randn(2, 2, 2 * n, 16), torch.randn(2, 2, 2 * n, 16)
    for kind, lp in (("bd3", 8), ("context_causal", 4)):
        flex = block_diffusion_attention(q, k, v, _block_mask(kind, n, lp, "cpu"))
        ref = block_diffusion_attention(q, k, v, dense_mask(kind, n, lp)[None, None])
        torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)
