"""The block-diffusion objective's own checks: AR limits, weights, noise levels, a training step, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from blocktrain.plugins.block_diffusion.noise import pbnc_concentration, sample_t
from blocktrain.plugins.block_diffusion.objective import add_mask_token, block_diffusion_loss, two_stream_logits
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.tasks.language import CausalLMTask

from .conftest import tiny_llama

L = 8


def batch(n=3, vocab=39, seed=1):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def test_block_size_one_at_t_one_is_ar_cross_entropy(llama):
    """BD3 mask, L' = 1, t = 1: every token but BOS masked; token i sees clean x_<i and its own mask token, so the
    loss is the AR cross-entropy of predicting x_i from [x_<i, MASK], recomputed here prefix by prefix. The
    gradients agree too, so both train along the same loss curve from the same seed."""
    mask_id = add_mask_token(llama)
    x0 = batch()
    t = torch.ones(3, L)
    loss = block_diffusion_loss(llama, x0, t, block_size=1, mask_id=mask_id)["diffusion"]
    grads = torch.autograd.grad(loss, list(llama.parameters()))
    total = 0.0
    for i in range(1, L):
        ids = torch.cat([x0[:, :i], torch.full((3, 1), mask_id)], 1)
        logits = llama(input_ids=ids).logits[:, -1].float()  # a plain causal pass
        logits[:, mask_id] = float("-inf")
        total = total + F.cross_entropy(logits, x0[:, i], reduction="sum")
    torch.testing.assert_close(loss, total / x0.numel(), rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, torch.autograd.grad(total / x0.numel(), list(llama.parameters()))):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_context_causal_clean_stream_is_the_causal_lm(llama):
    """NBDiff at L' = 1: nothing is masked (every token starts a block) and the AR term on the clean stream is
    exactly the engine's causal-LM loss."""
    mask_id = add_mask_token(llama)
    x0 = batch()
    terms = block_diffusion_loss(llama, x0, torch.full((3, L), 0.5), block_size=1, mask_id=mask_id,
                                 mask_kind="context_causal", shift=True, ar_weight=1.0)
    assert terms["diffusion"].item() == 0.0
    expected = CausalLMTask(None, {}).loss(llama, {"input_ids": x0})
    torch.testing.assert_close(terms["ar"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bd3", "context_causal"])
def test_noised_stream_ignores_later_blocks(llama, kind):
    """Changing block 1's clean tokens changes no noised logit of blocks 0 and 1 (no leak of the answer)."""
    mask_id = add_mask_token(llama)
    x0 = batch()
    xt = x0.clone()
    xt[:, 4:] = mask_id
    noised, _ = two_stream_logits(llama, xt, x0, 4, kind)
    x0b = x0.clone()
    x0b[:, 4:] = (x0b[:, 4:] + 1) % 39
    noised_b, _ = two_stream_logits(llama, xt, x0b, 4, kind)
    torch.testing.assert_close(noised, noised_b)


def test_emrs_block_weight_is_block_size_times_mean_masked_ce(llama):
    """EMRS: a block's loss is (1/t'_b) sum_masked CE = L'_b * mean masked CE; blocks with none give 0."""
    mask_id = add_mask_token(llama)
    x0 = batch(n=4)
    t = torch.tensor([[0.3, 0.0], [0.6, 0.9], [0.2, 0.5], [0.1, 0.7]])
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    emrs = block_diffusion_loss(llama, x0, t, block_size=4, mask_id=mask_id, weighting="emrs", generator=g(),
                                ignore_bos=False)["diffusion"]
    # recompute the same masking by hand
    masked = torch.rand(x0.shape, generator=g()) < t.repeat_interleave(4, 1)
    xt = torch.where(masked, mask_id, x0)
    noised, _ = two_stream_logits(llama, xt, x0, 4, "bd3")
    logits = noised.float()
    logits[..., mask_id] = float("-inf")
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(4, 2, 4)
    m = masked.view(4, 2, 4)
    per_block = torch.where(m.any(-1), 4 * (ce * m).sum(-1) / m.sum(-1).clamp(min=1), 0)
    assert not m[0, 1].any()  # a block with nothing masked
    torch.testing.assert_close(emrs, per_block.sum() / x0.numel(), rtol=1e-5, atol=1e-6)


def test_masked_reduction_divides_by_masked_tokens(llama):
    mask_id = add_mask_token(llama)
    x0, t = batch(), torch.full((3, 2), 0.5)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    by_tokens = block_diffusion_loss(llama, x0, t, block_size=4, mask_id=mask_id, generator=g())["diffusion"]
    by_masked = block_diffusion_loss(llama, x0, t, block_size=4, mask_id=mask_id, generator=g(),
                                     reduction="masked")["diffusion"]
    n_masked = int(((torch.rand(x0.shape, generator=g()) < 0.5) & (torch.arange(L) > 0)).sum())
    torch.testing.assert_close(by_masked, by_tokens * x0.numel() / n_masked)


def test_noise_levels():
    t = sample_t(4, 5, eps_min=0.2, eps_max=0.7, generator=torch.Generator().manual_seed(0))
    strata = ((t.flatten() - 0.2) / 0.5 * 20).floor().long()
    assert sorted(strata.tolist()) == list(range(20))  # antithetic: one value per stratum of [eps_min, eps_max]
    seq = sample_t(4, 5, granularity="sequence")
    assert torch.equal(seq, seq[:, :1].expand(4, 5))  # SDAR: one level for all blocks of a sequence
    torch.manual_seed(0)
    early = sample_t(20000, 1, schedule="beta", beta_c=pbnc_concentration(0, 100, 2, 50), eps_min=0, eps_max=1)
    late = sample_t(20000, 1, schedule="beta", beta_c=pbnc_concentration(100, 100, 2, 50), eps_min=0, eps_max=1)
    assert abs(early.mean() - 0.8) < 0.01 and abs(late.mean() - 0.8) < 0.005  # PBNC: mean stays mu
    assert abs(early.std() - 0.231) < 0.01 and abs(late.std() - 0.056) < 0.003  # ... while the sd shrinks


def test_training_steps_lower_the_loss():
    model = tiny_llama().train()
    mask_id = add_mask_token(model)
    x0 = (torch.arange(8)[:, None] * 3 + torch.arange(L)) % 39  # counting sequences: learnable structure

    def loss(seed):
        t = sample_t(8, 2, generator=torch.Generator().manual_seed(seed))
        return block_diffusion_loss(model, x0, t, block_size=4, mask_id=mask_id,
                                    generator=torch.Generator().manual_seed(seed))["diffusion"]

    with torch.no_grad():
        before = sum(float(loss(100 + s)) for s in range(4))  # fixed noise draws, measured before and after
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(25):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(loss(100 + s)) for s in range(4))
    assert after < 0.75 * before, (before, after)


def test_mask_token_added_and_bad_input(llama):
    rows = llama.get_input_embeddings().num_embeddings
    assert add_mask_token(llama) == rows and llama.get_output_embeddings().weight.shape[0] == rows + 1
    with pytest.raises(UserError, match="block_size=3 must divide"):
        block_diffusion_loss(llama, batch(), torch.ones(3, 3), block_size=3, mask_id=rows)
    with pytest.raises(UserError, match="mask_token_id"):
        add_mask_token(llama, reading="embedding")
    assert add_mask_token(llama, reading="embedding", mask_token_id=7) == 7


@pytest.mark.parametrize("shift", [False, True])
def test_nelbo_is_per_predicted_token(llama, shift):
    """A model that predicts every token uniformly has NELBO log V per token it predicts: position 0 (never
    predicted under ignore_bos or the shift) is left out of the count, not averaged in as a free zero."""
    from blocktrain.plugins.block_diffusion.objective import nelbo_sums

    mask_id = add_mask_token(llama)
    torch.nn.init.zeros_(llama.get_output_embeddings().weight)  # constant logits: uniform over the 40 real tokens
    x0 = torch.randint(0, 40, (4000, L), generator=torch.Generator().manual_seed(0))
    total, count = nelbo_sums(llama, x0, block_size=4, mask_id=mask_id, shift=shift,
                              mask_kind="context_causal" if shift else "bd3", generator=torch.Generator().manual_seed(1))
    assert count == 4000 * (L - 1)
    assert abs(total / count - math.log(40)) < 0.03 * math.log(40)  # the old count was off by (L - 1) / L = 12.5%


def test_noised_block_reads_the_earlier_clean_blocks_at_their_positions(llama):
    """In the model as run, noised block 1 gets exactly the logits of a single-stream pass over [x_0 block 0 ;
    x_t block 1] at positions 0..7 (so both streams carry positions 0..L-1 and M_OBC reaches block 0's clean
    tokens), and changing block 0's clean tokens changes them."""
    from blocktrain.plugins.block_diffusion.sampler import context_mask

    mask_id = add_mask_token(llama)
    x0 = batch()
    xt = x0.clone()
    xt[:, [1, 5, 6]] = mask_id
    noised, _ = two_stream_logits(llama, xt, x0, 4, "bd3")
    ids = torch.cat([x0[:, :4], xt[:, 4:]], 1)
    single = llama(input_ids=ids, attention_mask=context_mask(L, 4, "bd3", "cpu")[None, None],
                   position_ids=torch.arange(L)[None].expand(3, -1)).logits
    torch.testing.assert_close(noised[:, 4:], single[:, 4:], rtol=1e-5, atol=1e-5)
    x0b = x0.clone()
    x0b[:, 0] = (x0b[:, 0] + 1) % 39
    assert (two_stream_logits(llama, xt, x0b, 4, "bd3")[0][:, 4:] - noised[:, 4:]).abs().max() > 1e-3


def test_abns_variance_drop_matches_var_t_mu():
    """SDAR-VL's ABNS, with the weights fixed: drawing t per block instead of per sequence lowers the variance of a
    sequence's loss estimate (the mean of its B block losses) by (1 - 1/B) Var_t mu(t), mu(t) = E[l_b | t], and
    leaves its mean unchanged. The model is first trained a few steps on blocks of one repeated token, so a masked
    token is easy while its block has a clean token left and mu(t) rises steeply with t. mu(t) is measured
    separately, on a grid of t with many mask draws; both variances from 2000 draws on one fixed sequence. A
    sampler that drew one t per sequence for ``block`` would show no drop, 6 standard errors away."""
    vocab, size, blocks, lo = 8, 4, 4, 0.05
    g = torch.Generator().manual_seed(0)
    data = lambda n: torch.randint(0, vocab, (n, blocks), generator=g).repeat_interleave(size, 1)  # noqa: E731
    model = tiny_llama(vocab=vocab)
    mask_id = add_mask_token(model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        loss = block_diffusion_loss(model, data(32), sample_t(32, blocks, generator=g), block_size=size,
                                    mask_id=mask_id, ignore_bos=False, generator=g)["diffusion"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = data(1)

    @torch.no_grad()
    def block_losses(t, seed):  # [rows, B]: l_b of x at noise levels t [rows, B]
        return block_diffusion_loss(model, x.expand(t.shape[0], -1), t, block_size=size, mask_id=mask_id,
                                    ignore_bos=False, per_block=True,
                                    generator=torch.Generator().manual_seed(seed))["per_block"]

    grid, draws = lo + (1 - lo) * (torch.arange(40) + 0.5) / 40, 30  # midpoints of [lo, 1]
    mu = block_losses(grid.repeat_interleave(draws)[:, None].expand(-1, blocks).contiguous(), 1).view(40, draws, -1).mean((1, 2))
    predicted = (1 - 1 / blocks) * float(mu.var(correction=0))
    est = {}
    for i, granularity in enumerate(("sequence", "block")):
        t = sample_t(2000, blocks, granularity=granularity, eps_min=lo, antithetic=False, generator=g).contiguous()
        est[granularity] = block_losses(t, 2 + i).mean(1)

    def var_se(e):  # standard error of the sample variance
        c = e - e.mean()
        return float(((c ** 4).mean() - (c ** 2).mean() ** 2) / len(e)) ** 0.5

    drop = float(est["sequence"].var() - est["block"].var())
    se = math.hypot(var_se(est["sequence"]), var_se(est["block"]))
    assert predicted > 6 * se
    assert abs(drop - predicted) < 3 * se, (drop, predicted, se)
    mean_se = math.hypot(float(est["sequence"].std()), float(est["block"].std())) / 2000 ** 0.5
    assert abs(float(est["sequence"].mean() - est["block"].mean())) < 4 * mean_se
