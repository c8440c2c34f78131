"""The block-diffusion objective on a transformers causal LM: the mask token, the vectorised two-stream
forward on ``[x_t ; x_0]`` and the NELBO with its weights and reductions.

``block_diffusion_loss`` returns the diffusion term (SUBS parameterisation: the mask token's logit is -inf and
only masked positions are scored, unmasked ones being copied) weighted per token by

- ``nominal``: 1/t of the token's block (BD3-LM's ``loss_scale``), or
- ``emrs``: 1/t'_b with t'_b the block's realised masked ratio |M_b| / (eligible tokens of b) (SDAR-VL's EMRS;
  a block without masked tokens contributes 0),

summed and divided by all scored tokens (``tokens``, BD3-LM) or by the masked tokens (``masked``, SDAR); and,
where asked, NBDiff's auxiliary AR term: next-token cross-entropy on the clean stream (context-causal mask only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blocktrain.kernels.block_diffusion_attention import attention_mask
from blocktrain.plugins.block_diffusion.noise import eligible_positions, mask_tokens
from blocktrain.trainer.errors import UserError

MASK_TOKEN = "<|mdm_mask|>"


def add_mask_token(model, tokenizer=None, reading: str = "add", mask_token_id: int | None = None) -> int:
    """The mask token id, made available to ``model``.

    ``add`` (BD3-LM): the tokenizer's own mask token if it has one, else a new id appended to the vocabulary (to
    the tokenizer too, when there is one) and the embeddings resized; ``embedding`` (SDAR): the existing id
    ``mask_token_id``, whose embedding is the mask's input.
    """
    rows = model.get_input_embeddings().num_embeddings
    saved = getattr(model.config, "mask_token_id", None) if getattr(model.config, "block_diffusion", None) else None
    if saved is not None and saved < rows:  # a model this plugin exported: its mask token is already there
        return int(saved)
    if reading == "embedding":
        if mask_token_id is None or not 0 <= mask_token_id < rows:
            raise UserError(f"plugin.block_diffusion.mask_token_id must be an id in [0, {rows}) with "
                            f"mask_reading=embedding, got {mask_token_id}")
        return mask_token_id
    if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None and tokenizer.mask_token_id < rows:
        return int(tokenizer.mask_token_id)
    new_id = rows
    if tokenizer is not None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        new_id = max(rows, int(tokenizer.mask_token_id))
    model.resize_token_embeddings(new_id + 1, mean_resizing=True)
    return new_id


def position_ids(batch: int, seq_len: int, device) -> torch.Tensor:
    """Both streams carry positions 0..L-1."""
    return torch.arange(seq_len, device=device).repeat(2)[None].expand(batch, -1)


def two_stream_logits(model, xt: torch.Tensor, x0: torch.Tensor, block_size: int,
                      mask_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the noised and of the clean stream from one forward over ``[x_t ; x_0]``."""
    n, length = x0.shape
    out = model(input_ids=torch.cat([xt, x0], dim=1),
                attention_mask=attention_mask(mask_kind, length, block_size, x0.device),
                position_ids=position_ids(n, length, x0.device), use_cache=False)
    return out.logits[:, :length], out.logits[:, length:]


def subs_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: log-probabilities in float32 with the mask token's logit at -inf."""
    logits = logits.float()
    logits[..., mask_id] = float("-inf")
    return logits.log_softmax(-1)


def check_lengths(seq_len: int, block_size: int) -> None:
    if block_size < 1 or seq_len % block_size:
        raise UserError(f"plugin.block_diffusion.block_size={block_size} must divide the sequence length "
                        f"{seq_len} (data.seq_len)")


def block_diffusion_loss(model, x0: torch.Tensor, t: torch.Tensor, *, block_size: int, mask_id: int,
                         mask_kind: str = "bd3", shift: bool = False, scored: torch.Tensor | None = None,
                         weighting: str = "nominal", reduction: str = "tokens", ignore_bos: bool = True,
                         ar_weight: float = 0.0, generator: torch.Generator | None = None,
                         block_first: bool = False, per_block: bool = False) -> dict[str, torch.Tensor]:
    """Loss terms ``{"diffusion": ..., ["ar": ...]}`` for clean tokens ``x0 [N, L]`` at block noise levels
    ``t [N, L/block_size]``; ``scored`` marks the tokens to score (default all). ``block_first`` (with ``shift``)
    adds ``"block_first"``: the AR head's NLL of each block's first token, which the diffusion term leaves out.
    ``per_block`` adds ``"per_block"`` ``[N, L/block_size]``: each block's mean weighted token loss (no gradient),
    whose variance the clip search minimises."""
    n, length = x0.shape
    check_lengths(length, block_size)
    scored = torch.ones_like(x0, dtype=torch.bool) if scored is None else scored.bool()
    eligible = eligible_positions(scored, block_size, ignore_bos, keep_block_first=shift)
    xt, masked = mask_tokens(x0, t, eligible, block_size, mask_id, generator)
    noised, clean = two_stream_logits(model, xt, x0, block_size, mask_kind)
    if shift:  # the logit at position i predicts token i + 1; position 0 is never masked
        noised = torch.cat([noised[:, :1], noised[:, :-1]], dim=1)
    nll = -subs_log_probs(noised, mask_id).gather(-1, x0[..., None]).squeeze(-1)
    if weighting == "emrs":
        block_sum = lambda m: m.view(n, -1, block_size).sum(-1).float()  # noqa: E731
        ratio = block_sum(masked) / block_sum(eligible).clamp(min=1)
        weight = torch.where(ratio > 0, 1 / ratio.clamp(min=1e-12), 0).repeat_interleave(block_size, dim=1)
    else:
        weight = 1 / t.repeat_interleave(block_size, dim=1)
    token_loss = nll.masked_fill(~masked, 0) * weight
    denom = masked.sum() if reduction == "masked" else scored.sum()
    terms = {"diffusion": token_loss.sum() / denom.clamp(min=1)}
    if per_block:
        terms["per_block"] = token_loss.detach().view(n, -1, block_size).mean(-1)
    if ar_weight > 0:
        targets = x0[:, 1:].masked_fill(~scored[:, 1:], -100)
        terms["ar"] = ar_weight * F.cross_entropy(clean[:, :-1].float().flatten(0, 1), targets.flatten(),
                                                  ignore_index=-100)
    if shift and block_first:
        first = torch.zeros_like(scored)
        first[:, block_size::block_size] = True
        first &= scored
        ar_nll = -subs_log_probs(clean[:, :-1], mask_id).gather(-1, x0[:, 1:, None]).squeeze(-1)
        terms["block_first"] = ar_nll.masked_fill(~first[:, 1:], 0).sum() / denom.clamp(min=1)
    return terms


@torch.no_grad()
def nelbo_sums(model, x0: torch.Tensor, *, block_size: int, mask_id: int, mask_kind: str = "bd3",
               shift: bool = False, scored: torch.Tensor | None = None, ignore_bos: bool = True,
               generator: torch.Generator | None = None) -> tuple[float, int]:
    """Summed NELBO (nats) of ``x0`` and the number of tokens it covers (scored ones, less the never-predicted
    position 0 under ``ignore_bos`` or the shift): the reported bound, always with the uniform
    schedule on [1e-3, 1], nominal 1/t weights and one t per block, whatever the training objective (with the
    logit shift, each block's first token is scored by the AR head)."""
    from blocktrain.plugins.block_diffusion.noise import sample_t

    n, length = x0.shape
    scored = torch.ones_like(x0, dtype=torch.bool) if scored is None else scored.bool()
    t = sample_t(n, length // block_size, device=x0.device, generator=generator)
    terms = block_diffusion_loss(model, x0, t, block_size=block_size, mask_id=mask_id, mask_kind=mask_kind,
                                 shift=shift, scored=scored, ignore_bos=ignore_bos, generator=generator,
                                 block_first=True)
    denom = int(scored.sum())  # the loss's divisor
    covered = scored.clone()  # the tokens the bound covers: position 0 is never predicted under ignore_bos or the shift
    if ignore_bos or shift:
        covered[:, 0] = False
    return float(sum(terms.values())) * denom, int(covered.sum())
