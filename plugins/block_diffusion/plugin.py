"""The ``block_diffusion`` plugin: BD3-LM / SDAR / SDAR-VL / NBDiff block diffusion on a transformers causal LM.

It adds the mask token, switches the model's attention to the block-diffusion op, replaces the task loss by the
block-diffusion NELBO (and NBDiff's AR term), reports the NELBO bound, and samples block by block with a KV
cache. This module imports no torch, so a run's config is validated before anything heavy loads.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin, PluginConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from blocktrain.trainer.context import RunContext

KEY = "plugin.block_diffusion"
CHOICES = {
    "attention": ("bd3", "context_causal"),
    "mask_reading": ("add", "embedding"),
    "noise_granularity": ("sequence", "block"),
    "noise_schedule": ("uniform", "beta"),
    "weighting": ("nominal", "emrs"),
    "reduction": ("tokens", "masked"),
}
STRATEGIES = ("first_hitting", "ddpm", "sequential", "low_confidence_static", "low_confidence_dynamic",
              "entropy_bounded", "confidence_threshold")
STEP_FREE_STRATEGIES = ("first_hitting", "confidence_threshold")  # commit until the block is full; ``steps`` unused


def _choice(section: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{section}.{key} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class SamplerConfig:
    """``plugin.block_diffusion.sampler``: the `sample` stage."""

    strategy: str = "first_hitting"  # one of STRATEGIES (see sampler.py)
    steps: Optional[int] = None  # forward passes per block (NFE per block; ddpm: time points); null = one per token
    threshold: float = 0.9  # low_confidence_dynamic / confidence_threshold: commit every token at least this probable
    entropy_bound: float = 0.35  # entropy_bounded: summed entropy (nats) of the tokens committed in one pass (SDAR)
    sub_blocks: int = 1  # confidence_threshold: sub-blocks decoded left to right within a block (NBDiff)
    temperature: float = 0.0  # 0 = greedy
    kv_cache: bool = True
    prompts: Optional[str] = None  # a file of prompts: one per line (.txt) or JSON lines ("..." or {"prompt": "..."})
    num_samples: int = 4  # without prompts: sequences taken from the val split (else train)
    prompt_blocks: int = 1  # without prompts: leading blocks of each held-out sequence used as the prompt
    num_blocks: int = 8  # blocks generated after the prompt
    seed: int = 0
    judge: Optional[Dict[str, Any]] = None  # Gen-PPL: an AR model node (as `model:`) that scores the samples

    def __post_init__(self):
        _choice(f"{KEY}.sampler", "strategy", self.strategy, STRATEGIES)
        if self.steps is not None and self.steps < 1:
            raise UserError(f"{KEY}.sampler.steps={self.steps}: a block needs at least 1 forward pass (NFE >= 1)")
        for key in ("num_samples", "prompt_blocks", "num_blocks"):
            if getattr(self, key) < 1:
                raise UserError(f"{KEY}.sampler.{key} must be >= 1, got {getattr(self, key)}")
        if self.temperature < 0 or not 0 <= self.threshold <= 1 or self.entropy_bound < 0 or self.sub_blocks < 1:
            raise UserError(f"{KEY}.sampler.temperature and entropy_bound must be >= 0, threshold in [0, 1], "
                            "sub_blocks >= 1")
        if self.prompts is not None:
            read_prompts(self.prompts)


def read_prompts(path: str) -> list[str]:
    """The prompts of a file: one per non-blank line, or with a ``.jsonl`` suffix one JSON string or object with a
    ``prompt`` field per line."""
    where = f"{KEY}.sampler.prompts={path}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{where}: no such file (one prompt per line, or JSON lines with a \"prompt\" field)")
    lines = [(i, line) for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"{where}: the file holds no prompts")
    if file.suffix != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for i, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: line {i} is not JSON ({e.msg})") from None
        item = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(item, str) or not item:
            raise UserError(f"{where}: line {i} must be a non-empty string or an object with a \"prompt\" string")
        prompts.append(item)
    return prompts


@dataclass
class BlockDiffusionConfig(PluginConfig):
    """``plugin.block_diffusion``: block size, masks, mask token, noise and loss switches, sampler."""

    block_size: int = 4  # L': tokens per block (1 = AR, the sequence length = MDLM)
    attention: str = "bd3"  # bd3: M_BD | M_OBC | M_BC (BD3-LM, SDAR) | context_causal: clean stream token-causal (NBDiff)
    shift_logits: bool = False  # NBDiff: the logit at i predicts token i+1; each block's first token stays clean
    mask_reading: str = "add"  # add: a mask id appended to the vocabulary (BD3) | embedding: mask_token_id's embedding (SDAR)
    mask_token_id: Optional[int] = None  # mask_reading=embedding: the existing id whose embedding marks a mask
    noise_granularity: str = "block"  # block: one t per block (BD3 code, SDAR-VL ABNS) | sequence: one t per sequence (SDAR)
    noise_schedule: str = "uniform"  # uniform on [eps_min, eps_max] | beta: SDAR-VL PBNC, Beta(mu*C, (1-mu)*C)
    eps_min: float = 0.001  # clipped noise interval (BD3-LM's sampling_eps_min/max)
    eps_max: float = 1.0
    antithetic: bool = True  # stratify the uniform draws over the batch's blocks (BD3-LM)
    weighting: str = "nominal"  # nominal: 1/t | emrs: 1/t' with t' the block's realised masked ratio (SDAR-VL)
    reduction: str = "tokens"  # tokens: / all scored tokens (BD3) | masked: / masked tokens (SDAR)
    ignore_bos: bool = True  # position 0 is never masked (BD3-LM)
    ar_loss_weight: float = 0.0  # NBDiff's auxiliary AR loss on the clean stream (needs attention=context_causal)
    pbnc_mu: float = 0.8  # PBNC Beta mean
    pbnc_c_start: float = 2.0  # PBNC concentration, ramped linearly ...
    pbnc_c_end: float = 50.0  # ... to this
    pbnc_ramp_steps: Optional[int] = None  # over this many steps; null = trainer.max_steps
    clip_search: bool = False  # BD3-LM's data-driven clip: train on the val-variance-minimising interval
    clip_search_widths: List[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    clip_search_delta: float = 0.05  # step between candidate interval starts
    clip_search_batches: int = 8  # val batches per search (BD3-LM: 100)
    curriculum: List[int] = field(default_factory=list)  # NBDiff: block sizes trained before block_size, e.g. [1, 2]
    curriculum_steps: int = 100  # optimizer steps per curriculum block size
    eval_batches: Optional[int] = None  # evaluate: val batches in the NELBO bound; null = all
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        for key, allowed in CHOICES.items():
            _choice(KEY, key, getattr(self, key), allowed)
        if self.block_size < 1 or any(b < 1 for b in self.curriculum):
            raise UserError(f"{KEY}.block_size and {KEY}.curriculum must be >= 1")
        if self.mask_reading == "embedding" and self.mask_token_id is None:
            raise UserError(f"{KEY}.mask_reading=embedding needs {KEY}.mask_token_id (the id whose embedding "
                            "marks a masked token); or use mask_reading=add to append a mask id to the vocabulary")
        if not 0 <= self.eps_min <= self.eps_max <= 1 or self.eps_max == 0:
            raise UserError(f"{KEY}.eps_min/eps_max must satisfy 0 <= eps_min <= eps_max <= 1, eps_max > 0; "
                            f"got {self.eps_min}, {self.eps_max}")
        if self.ar_loss_weight < 0:
            raise UserError(f"{KEY}.ar_loss_weight must be >= 0, got {self.ar_loss_weight}")
        if self.ar_loss_weight > 0 and self.attention != "context_causal":
            raise UserError(f"{KEY}.ar_loss_weight > 0 needs {KEY}.attention=context_causal: under the bd3 mask the "
                            "clean stream sees the rest of its block, so next-token prediction would leak the answer")
        if not 0 < self.pbnc_mu < 1 or self.pbnc_c_start <= 0 or self.pbnc_c_end <= 0:
            raise UserError(f"{KEY}.pbnc_mu must be in (0, 1) and pbnc_c_start/pbnc_c_end > 0")
        if self.clip_search and (self.clip_search_batches < 1 or not 0 < self.clip_search_delta < 1
                                 or any(not 0 < w <= 1 for w in self.clip_search_widths)):
            raise UserError(f"{KEY}.clip_search needs clip_search_batches >= 1, clip_search_delta in (0, 1) and "
                            "clip_search_widths in (0, 1]")
        if self.curriculum_steps < 1:
            raise UserError(f"{KEY}.curriculum_steps must be >= 1, got {self.curriculum_steps}")
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig(**self.sampler)


class BlockDiffusionPlugin(Plugin):
    """Block diffusion (BD3-LM base; SDAR, SDAR-VL and NBDiff as switches) as the run's objective."""

    name = "block_diffusion"
    description = "Block diffusion LM (BD3-LM; SDAR/SDAR-VL/NBDiff switches): two-stream masks, NELBO, KV-cached sampler"
    config_class = BlockDiffusionConfig
    kind = "objective"
    replaces_task_loss = True

    def __init__(self, config: BlockDiffusionConfig):
        super().__init__(config)
        self.mask_id: int | None = None
        self.eps = (config.eps_min, config.eps_max)  # the training interval (the clip search moves it)
        self.clip_search = None

    # -- surgery -------------------------------------------------------------------------------
    def apply(self, model, run):
        from blocktrain.kernels.block_diffusion_attention import register_hf_attention
        from blocktrain.plugins.block_diffusion.objective import add_mask_token, check_lengths

        c = self.config
        if not hasattr(model, "get_input_embeddings") or not hasattr(model, "set_attn_implementation"):
            raise UserError(f"plugin block_diffusion needs a transformers causal LM (model.auto_class="
                            f"AutoModelForCausalLM), got {type(model).__name__}")
        seq_len = (run.data.info.get("seq_len") if run.data is not None else None)
        if seq_len is not None:
            for size in [*c.curriculum, c.block_size]:
                check_lengths(int(seq_len), size)
        self.mask_id = add_mask_token(model, run.tokenizer, c.mask_reading, c.mask_token_id)
        model.set_attn_implementation(register_hf_attention())
        model.config.mask_token_id = self.mask_id
        model.config.block_diffusion = {"block_size": c.block_size, "attention": c.attention,
                                        "shift_logits": c.shift_logits, "mask_reading": c.mask_reading}
        return model

    # -- objective -----------------------------------------------------------------------------
    def block_size_at(self, step: int) -> int:
        """NBDiff's curriculum: ``curriculum[i]`` for steps [i*curriculum_steps, (i+1)*curriculum_steps), then block_size."""
        stage = step // self.config.curriculum_steps
        return self.config.curriculum[stage] if stage < len(self.config.curriculum) else self.config.block_size

    def _scored(self, batch):
        import torch

        x0 = batch["input_ids"]
        scored = torch.ones_like(x0, dtype=torch.bool)
        if "labels" in batch and batch["labels"].shape == x0.shape:
            scored &= batch["labels"] != -100
        if "attention_mask" in batch:
            scored &= batch["attention_mask"].bool()
        return x0, scored

    def loss(self, model, batch, run):
        from blocktrain.plugins.block_diffusion.noise import pbnc_concentration, sample_t
        from blocktrain.plugins.block_diffusion.objective import block_diffusion_loss

        c = self.config
        trainer = getattr(run, "trainer", None)
        step = int(trainer.global_step) if trainer is not None else 0
        block_size = self.block_size_at(step)
        x0, scored = self._scored(batch)
        ramp = c.pbnc_ramp_steps or (int(trainer.max_steps) if trainer is not None and trainer.max_steps > 0 else 1)
        t = sample_t(x0.shape[0], x0.shape[1] // block_size, granularity=c.noise_granularity,
                     schedule=c.noise_schedule, eps_min=self.eps[0], eps_max=self.eps[1], antithetic=c.antithetic,
                     beta_mu=c.pbnc_mu, beta_c=pbnc_concentration(step, ramp, c.pbnc_c_start, c.pbnc_c_end),
                     device=x0.device)
        return block_diffusion_loss(model, x0, t, block_size=block_size, mask_id=self.mask_id,
                                    mask_kind=c.attention, shift=c.shift_logits, scored=scored,
                                    weighting=c.weighting, reduction=c.reduction, ignore_bos=c.ignore_bos,
                                    ar_weight=c.ar_loss_weight)

    # -- evaluation ----------------------------------------------------------------------------
    def _nelbo(self, model, batch, generator=None):
        from blocktrain.plugins.block_diffusion.objective import nelbo_sums

        c = self.config
        x0, scored = self._scored(batch)
        return nelbo_sums(model, x0, block_size=c.block_size, mask_id=self.mask_id, mask_kind=c.attention,
                          shift=c.shift_logits, scored=scored, ignore_bos=c.ignore_bos, generator=generator)

    def eval_sums(self, model, batch, run):
        total, count = self._nelbo(model, batch)
        trainer = getattr(run, "trainer", None)
        if self.clip_search is not None and not getattr(trainer, "sanity_checking", False):
            c = self.config
            x0, scored = self._scored(batch)
            self.clip_search.record(model, x0, scored, block_size=c.block_size, mask_id=self.mask_id,
                                    mask_kind=c.attention, shift=c.shift_logits, ignore_bos=c.ignore_bos,
                                    granularity=c.noise_granularity, antithetic=c.antithetic)
        return {"nelbo": (total, count)}

    def callbacks(self, run):
        if not self.config.clip_search:
            return []
        from blocktrain.plugins.block_diffusion.clip_search import ClipSearch, ClipSearchCallback

        c = self.config
        self.clip_search = ClipSearch(c.eps_min, c.clip_search_widths, c.clip_search_delta, c.clip_search_batches)
        return [ClipSearchCallback(self)]

    def evaluate(self, model, run):
        """The NELBO bound (nats/token) and its perplexity over the val split, with a fixed noise seed."""
        import torch

        if run.data is None or run.data.val is None:
            return {}
        loader = torch.utils.data.DataLoader(run.data.val, batch_size=run.cfg.data.get("eval_batch_size")
                                             or run.cfg.data.batch_size, collate_fn=run.data.collate_fn)
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(int(run.cfg.seed))
        total, count = 0.0, 0
        for i, batch in enumerate(run.progress(loader, description="block-diffusion NELBO")):
            if self.config.eval_batches is not None and i >= self.config.eval_batches:
                break
            s, n = self._nelbo(model, {k: v.to(device) for k, v in batch.items()}, generator)
            total, count = total + s, count + n
        nelbo = total / max(count, 1)
        out = {"block_diffusion/nelbo": nelbo, "block_diffusion/ppl_bound": math.exp(min(nelbo, 50.0))}
        if "nll_floor" in run.data.info:  # a synthetic source with a known entropy rate: the floor of the tokens scored
            skip_first = self.config.ignore_bos or self.config.shift_logits
            out["block_diffusion/nll_floor"] = float(run.data.info["nll_floor_after_first" if skip_first else "nll_floor"])
        return out

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, model, run):
        """Samples continuing each prompt (``sampler.prompts``, else held-out sequences' leading blocks); prompts of
        one length are sampled as a batch, rows are reported in prompt order."""
        import torch

        from blocktrain.plugins.block_diffusion.sampler import judge_nll, sample_blocks
        from blocktrain.trainer.media import Table

        c, s = self.config, self.config.sampler
        device = next(model.parameters()).device
        prompts = self._prompts(run)
        generator = torch.Generator(device).manual_seed(s.seed)
        judge = self._judge(device) if s.judge else None
        score = getattr(run.data.val if run.data.val is not None else run.data.train, "log_likelihood", None)
        decode = self._decoder(run)
        rows: list = [None] * len(prompts)
        sums = dict(tokens=0, seconds=0.0, nfe=0, per_row=0, row_passes=0, judge=0.0, chain=0.0)
        for length in sorted({len(p) for p in prompts}):
            index = [i for i, p in enumerate(prompts) if len(p) == length]
            prompt = torch.stack([torch.as_tensor(prompts[i]) for i in index]).to(device)
            tokens, stats = sample_blocks(model, prompt, num_blocks=s.num_blocks, block_size=c.block_size,
                                          mask_id=self.mask_id, mask_kind=c.attention, shift=c.shift_logits,
                                          steps=s.steps, strategy=s.strategy, threshold=s.threshold,
                                          entropy_bound=s.entropy_bound, sub_blocks=s.sub_blocks,
                                          temperature=s.temperature, kv_cache=s.kv_cache, generator=generator)
            for i, row in zip(index, tokens.tolist()):
                rows[i] = [decode(row[:length]), decode(row[length:])]
            sums["tokens"] += stats.tokens
            sums["seconds"] += stats.seconds
            sums["nfe"] += stats.nfe
            sums["per_row"] += stats.per_row
            sums["row_passes"] += stats.row_passes
            if judge is not None:
                sums["judge"] += float(judge_nll(judge, tokens, length).sum())
            if score is not None:  # a synthetic source that knows its true generator
                sums["chain"] -= float(score(tokens.cpu(), start=length).sum())
        out: dict[str, Any] = {
            "block_diffusion/samples": Table(columns=["prompt", "sample"], rows=rows),
            "block_diffusion/tokens_per_s": sums["tokens"] / max(sums["seconds"], 1e-9),
            "block_diffusion/nfe_per_token": sums["nfe"] / max(sums["per_row"], 1),
            "block_diffusion/tokens_per_step": sums["tokens"] / max(sums["row_passes"], 1),
        }
        if judge is not None:
            nll = sums["judge"] / max(sums["tokens"], 1)
            out.update({"block_diffusion/judge_nll": nll, "block_diffusion/gen_ppl": math.exp(min(nll, 50.0))})
        if score is not None:
            out["block_diffusion/sample_nll"] = sums["chain"] / max(sums["tokens"], 1)
        return out

    def _prompts(self, run) -> list[list[int]]:
        """Token ids of the prompts: the file's, encoded by the run's tokenizer (or the source's alphabet), else
        the leading ``prompt_blocks`` blocks of the first ``num_samples`` held-out sequences."""
        s = self.config.sampler
        if s.prompts is None:
            source = run.data.val if run.data.val is not None else run.data.train
            prompt_len = s.prompt_blocks * self.config.block_size
            rows = [list(map(int, source[i]["input_ids"])) for i in range(min(s.num_samples, len(source)))]
            if any(len(r) < prompt_len for r in rows):
                raise UserError(f"{KEY}.sampler.prompt_blocks={s.prompt_blocks} needs {prompt_len} prompt tokens; "
                                "the held-out sequences are shorter")
            return [r[:prompt_len] for r in rows]
        alphabet = (run.data.info.get("alphabet") if run.data is not None else None) or ""
        if run.tokenizer is not None:
            encode = lambda text: run.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        elif alphabet:
            encode = lambda text: [alphabet.index(ch) if ch in alphabet else -1 for ch in text]  # noqa: E731
        else:
            raise UserError(f"{KEY}.sampler.prompts needs a tokenizer to encode the prompts (model.processor) or a "
                            "source with an alphabet")
        texts = read_prompts(s.prompts)
        prompts = [encode(text) for text in texts]
        for text, ids in zip(texts, prompts):
            if not ids or -1 in ids:
                raise UserError(f"{KEY}.sampler.prompts: the prompt {text[:40]!r} encodes to no tokens or holds "
                                f"characters outside the alphabet {alphabet!r}")
        return prompts

    def _judge(self, device):
        """The Gen-PPL judge: an AR model (e.g. the model before adaptation) that scores the samples."""
        from blocktrain.trainer.sources.models import load_model

        return load_model(dict(self.config.sampler.judge)).model.to(device).eval()

    def _decoder(self, run):
        tokenizer = run.tokenizer
        if tokenizer is not None:
            return lambda ids: tokenizer.decode(ids)
        alphabet = (run.data.info.get("alphabet") if run.data is not None else None) or ""
        if alphabet:
            return lambda ids: "".join(alphabet[i] if i < len(alphabet) else "?" for i in ids)
        return lambda ids: " ".join(map(str, ids))

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mask_id": self.mask_id, "eps": list(self.eps)}

    def load_state_dict(self, state: dict) -> None:
        self.mask_id = state.get("mask_id", self.mask_id)
        self.eps = tuple(state.get("eps", self.eps))

