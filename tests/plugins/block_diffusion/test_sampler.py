"""Semi-AR sampling: the KV cache changes no token (greedy), and the commit strategies keep their NFE."""
import pytest
import torch

from blocktrain.plugins.block_diffusion.objective import add_mask_token
from blocktrain.plugins.block_diffusion.sampler import sample_blocks
from blocktrain.trainer.errors import UserError


@pytest.mark.parametrize("kind,shift", [("bd3", False), ("context_causal", True)])
@pytest.mark.parametrize("strategy,steps,temperature", [
    ("low_confidence_static", 2, 0.0), ("sequential", 4, 0.0), ("low_confidence_dynamic", 2, 0.0),
    ("first_hitting", None, 0.0), ("ddpm", 2, 0.0), ("ddpm", 16, 1.0), ("entropy_bounded", None, 0.0),
    ("confidence_threshold", None, 0.0)])
def test_kv_cache_equals_recomputation(llama, kind, shift, strategy, steps, temperature):
    mask_id = add_mask_token(llama)
    prompt = torch.randint(0, 39, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(num_blocks=3, block_size=4, mask_id=mask_id, mask_kind=kind, shift=shift, steps=steps,
              strategy=strategy, threshold=0.05, entropy_bound=8.0, sub_blocks=2, temperature=temperature)
    cached, stats = sample_blocks(llama, prompt, kv_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    plain, plain_stats = sample_blocks(llama, prompt, kv_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :4], prompt) and not (cached == mask_id).any()
    assert stats.nfe == plain_stats.nfe and stats.commit_passes == 4 and plain_stats.commit_passes == 0
    fill = 4 - int(shift)
    if strategy == "first_hitting":
        assert stats.nfe == 3 * fill  # one token per pass
    elif strategy == "ddpm":  # a forward only after a pass that changed a token (of either row)
        assert stats.nfe <= 3 * min(steps, 2 * fill)
    elif strategy == "entropy_bounded":  # two tokens of near-uniform entropy (~3.6 nats) fit under 8 nats, three do not
        assert stats.nfe == 3 * ((fill + 1) // 2)
    elif strategy == "confidence_threshold":  # at least one per pass and sub-block: 2 sub-blocks of 2
        assert 3 * 2 <= stats.nfe <= 3 * fill
    elif strategy != "low_confidence_dynamic":
        assert stats.nfe == 3 * min(steps, fill)
    else:
        assert stats.nfe <= 3 * steps


@pytest.mark.parametrize("threshold,max_nfe", [(0.99, 2), (0.0, 1)])
def test_dynamic_threshold_fills_every_block(llama, threshold, max_nfe):
    """Few tokens clear a high threshold: the static top-k still completes each block within ``steps`` passes;
    a zero threshold commits the whole block in one pass."""
    mask_id = add_mask_token(llama)
    prompt = torch.randint(0, 39, (2, 4), generator=torch.Generator().manual_seed(0))
    out, stats = sample_blocks(llama, prompt, num_blocks=2, block_size=4, mask_id=mask_id, steps=2,
                               strategy="low_confidence_dynamic", threshold=threshold)
    assert not (out == mask_id).any() and stats.nfe == 2 * max_nfe


def test_sampler_bad_input(llama):
    mask_id = add_mask_token(llama)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UserError, match="sub_blocks=3 must divide the block size 4"):
        sample_blocks(llama, prompt, num_blocks=1, block_size=4, mask_id=mask_id, strategy="confidence_threshold",
                      sub_blocks=3)
    with pytest.raises(UserError, match="at least 1 forward pass"):
        sample_blocks(llama, prompt, num_blocks=1, block_size=4, mask_id=mask_id, steps=0, strategy="sequential")
    with pytest.raises(UserError, match="at least one token"):
        sample_blocks(llama, prompt[:, :0], num_blocks=1, block_size=4, mask_id=mask_id)


@pytest.mark.parametrize("kind,shift", [("bd3", False), ("context_causal", True)])
def test_partial_prompt_opens_the_first_block(llama, kind, shift):
    """A 6-token prompt with L' = 4: one committed block, two prompt tokens kept in the first generated block;
    with a 2-token prompt nothing is cached before the first block. Cached = recomputed in both."""
    mask_id = add_mask_token(llama)
    for length in (6, 2):
        prompt = torch.randint(0, 39, (2, length), generator=torch.Generator().manual_seed(length))
        kw = dict(num_blocks=2, block_size=4, mask_id=mask_id, mask_kind=kind, shift=shift, steps=2,
                  strategy="low_confidence_static")
        cached, stats = sample_blocks(llama, prompt, **kw)
        plain, _ = sample_blocks(llama, prompt, kv_cache=False, **kw)
        assert torch.equal(cached, plain) and torch.equal(cached[:, :length], prompt)
        assert cached.shape[1] == (length // 4 + 2) * 4 and not (cached == mask_id).any()
        assert stats.per_row == cached.shape[1] - length and stats.nfe == 4


def test_entropy_bounded_commits_the_most_certain_under_the_bound():
    """Entropies 0.1, 0.3, 0.05, 2.0 with bound 0.35: 0.05 + 0.1 fit, + 0.3 does not; a row whose least
    uncertain position alone exceeds the bound still commits one."""
    from blocktrain.plugins.block_diffusion.sampler import CommitRule, _commit

    m = 99
    x = torch.full((2, 4), m)
    x0 = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    entropy = torch.tensor([[0.1, 0.3, 0.05, 2.0], [1.0, 0.9, 2.0, 3.0]])
    out = _commit(x, x0, torch.zeros(2, 4), entropy, m, CommitRule("entropy_bounded", entropy_bound=0.35), 1, 0, None)
    assert out.tolist() == [[1, m, 3, m], [m, 6, m, m]]


def test_confidence_threshold_stays_in_the_current_sub_block():
    """NBDiff: the best masked position of the leftmost unfinished sub-block plus every one there above the
    threshold; confident positions of later sub-blocks wait."""
    from blocktrain.plugins.block_diffusion.sampler import CommitRule, _commit

    m = 99
    x = torch.tensor([[m, m, m, m], [1, 2, m, m]])
    x0 = torch.tensor([[5, 6, 7, 8], [0, 0, 7, 8]])
    conf = torch.tensor([[0.2, 0.5, 0.95, 0.99], [0.99, 0.99, 0.3, 0.4]])
    rule = CommitRule("confidence_threshold", threshold=0.9, sub_blocks=2)
    out = _commit(x, x0, conf, torch.zeros(2, 4), m, rule, 1, 0, None)
    assert out.tolist() == [[m, 6, m, m], [1, 2, m, 8]]


def test_ddpm_caching_reuses_the_denoiser_output(llama):
    """BD3's DDPM update with T = 64 time points per 4-token block: at most one forward per committed token (a pass
    that unmasks nothing reuses the cached output), every block complete; each position's unmasking time is uniform
    over the T points."""
    from blocktrain.plugins.block_diffusion.sampler import CommitRule, _commit

    mask_id = add_mask_token(llama)
    prompt = torch.randint(0, 39, (2, 4), generator=torch.Generator().manual_seed(0))
    calls = []
    hook = llama.register_forward_hook(lambda *a: calls.append(1))
    out, stats = sample_blocks(llama, prompt, num_blocks=3, block_size=4, mask_id=mask_id, steps=64, strategy="ddpm",
                               generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert not (out == mask_id).any() and stats.nfe <= 3 * 2 * 4  # 2 rows x 4 tokens per block, not 64
    assert len(calls) == stats.nfe + stats.commit_passes  # NFE counts every denoising forward, no more
    g = torch.Generator().manual_seed(0)
    x, when, rule = torch.full((4000, 1), 9), torch.zeros(4000), CommitRule("ddpm")
    for i in range(4):
        new = _commit(x, torch.zeros_like(x), torch.ones(4000, 1), torch.zeros(4000, 1), 9, rule, 1, 1 / (4 - i), g)
        when[(new != x)[:, 0]] = i
        x = new
    assert not (x == 9).any() and (torch.bincount(when.long(), minlength=4) / 4000 - 0.25).abs().max() < 0.03


def test_judge_scores_the_samples_like_a_causal_lm(llama):
    """Gen-PPL's judge NLL of the generated part equals the causal-LM cross-entropy computed token by token;
    a judge with a smaller vocabulary is refused with one message."""
    import torch.nn.functional as F

    from blocktrain.plugins.block_diffusion.sampler import judge_nll

    tokens = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(2))
    nll = judge_nll(llama, tokens, 4)
    expected = torch.zeros(3)
    for i in range(4, 12):
        expected += F.cross_entropy(llama(input_ids=tokens[:, :i]).logits[:, -1].float(), tokens[:, i], reduction="none")
    torch.testing.assert_close(nll, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="the Gen-PPL judge has 40 output tokens but a sample holds id 45"):
        judge_nll(llama, torch.tensor([[1, 2, 45]]), 1)


def test_row_passes_are_each_rows_nfe_alone(llama):
    """A batch's NFE is its slowest row's; ``row_passes`` sums the passes each row needs, i.e. its NFE sampled alone
    (greedy, so a row's tokens do not depend on the batch)."""
    mask_id = add_mask_token(llama)
    prompt = torch.randint(0, 39, (6, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(num_blocks=3, block_size=8, mask_id=mask_id, strategy="confidence_threshold", threshold=0.032,
              sub_blocks=2, temperature=0.0)
    out, stats = sample_blocks(llama, prompt, **kw)
    alone = [sample_blocks(llama, prompt[i:i + 1], **kw) for i in range(6)]
    assert all(torch.equal(out[i:i + 1], a[0]) for i, a in enumerate(alone))
    assert stats.row_passes == sum(a[1].nfe for a in alone) < 6 * stats.nfe
    assert stats.tokens_per_step == pytest.approx(6 * stats.per_row / stats.row_passes)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_output_head_runs_only_where_logits_are_used(llama, kv_cache):
    """The prompt pass, the commit passes and the AR proposal of a block's first token need the last position's
    logits only; the denoising passes need the whole block's."""
    mask_id = add_mask_token(llama)
    head_rows = []
    hook = llama.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[1]))
    try:
        sample_blocks(llama, torch.zeros(2, 8, dtype=torch.long), num_blocks=2, block_size=4, mask_id=mask_id,
                      mask_kind="context_causal", shift=True, steps=1, strategy="sequential", kv_cache=kv_cache)
    finally:
        hook.remove()
    # cached: prompt, then per block (denoise 4, commit 1); recomputed: per block (proposal 1, denoise the block's 4)
    assert head_rows == ([1, 4, 1, 4, 1] if kv_cache else [1, 4, 1, 4])
