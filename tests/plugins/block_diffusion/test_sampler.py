"""Semi-AR sampling: the KV cache changes no token (greedy), and the commit strategies keep their NFE."""
import pytest
import torch

from blocktrain.plugins.block_diffusion.objective import add_mask_token
from blocktrain.plugins.block_diffusion.sampler import sample_blocks
from blocktrain.trainer.errors import UserError


@pytest.mark.parametrize("kind,shift", [("bd3", False), ("context_causal", True)])
@pytest.mark.parametrize("strategy,steps", [("low_confidence_static", 2), ("sequential", 4),
                                            ("low_confidence_dynamic", 2), ("first_hitting", None)])
def test_kv_cache_equals_recomputation(llama, kind, shift, strategy, steps):
    mask_id = add_mask_token(llama)
    prompt = torch.randint(0, 39, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(num_blocks=3, block_size=4, mask_id=mask_id, mask_kind=kind, shift=shift, steps=steps,
              strategy=strategy, threshold=0.05)
    cached, stats = sample_blocks(llama, prompt, kv_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    plain, plain_stats = sample_blocks(llama, prompt, kv_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(cached, plain)
    assert torch.equal(cached[:, :4], prompt) and not (cached == mask_id).any()
    assert stats.nfe == plain_stats.nfe and stats.commit_passes == 4 and plain_stats.commit_passes == 0
    fill = 4 - int(shift)
    if strategy == "first_hitting":
        assert stats.nfe == 3 * fill  # one token per pass
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
