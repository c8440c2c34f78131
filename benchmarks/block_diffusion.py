"""Block diffusion on synthetic order-2 Markov text with a known entropy rate: AR vs BD3 (L'=4, 16) vs MDLM.

Same model class (a tiny LlamaForCausalLM, fresh weights per arm and seed), data, optimiser, steps and batch per
arm. Reported per arm: the held-out NLL (AR: exact next-token NLL; the diffusion arms: the NELBO bound with uniform
t on [1e-3, 1] and 1/t weights) next to the chain's NLL floor, and the NLL per generated token of samples
(temperature 1) under the true chain: AR decoding at NFE = L, the diffusion arms with the KV-cached sampler,
low-confidence static commits at NFE = L/2.

    python benchmarks/block_diffusion.py --steps 400 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from blocktrain.kernels.block_diffusion_attention import register_hf_attention
from blocktrain.plugins.block_diffusion import add_mask_token, block_diffusion_loss, nelbo_sums, sample_blocks, sample_t
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


def run_arm(arm, seed, chain, train, val, args):
    block = {"ar": None, "bd3_4": 4, "bd3_16": 16, "mdlm": args.seq_len}[arm]
    model = make_model(args.vocab, seed, args)
    mask_id = add_mask_token(model) if block else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        x = train[torch.randint(0, train.shape[0], (args.batch,), generator=g)]
        if block:
            t = sample_t(args.batch, args.seq_len // block, generator=g)
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
        for i in range(0, val.shape[0], args.batch):
            x = val[i:i + args.batch]
            if block:
                s, n = nelbo_sums(model, x, block_size=block, mask_id=mask_id, generator=eg)
            else:
                s, n = ar_nll(model, x)
                s = float(s)
            total, count = total + s, count + n
    prompt = val[:args.samples, :4]
    sg = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        if block:  # the 4-token prompt opens (or, at L' = 4, is) the first block; L'/2 passes per block
            out, stats = sample_blocks(model, prompt, num_blocks=args.seq_len // block - (block == 4),
                                       block_size=block, mask_id=mask_id, strategy=args.strategy,
                                       steps=block // 2, temperature=1.0, generator=sg)
            nfe = stats.nfe_per_token
        else:
            out = model.generate(prompt, do_sample=True, top_k=0, max_new_tokens=args.seq_len - 4,
                                 min_new_tokens=args.seq_len - 4, pad_token_id=0)
            nfe = 1.0
    sample_s = time.perf_counter() - start
    gen = out[:, :args.seq_len]
    sample_nll = float(-chain.log_likelihood(gen, start=4).sum() / (gen.shape[0] * (gen.shape[1] - 4)))
    return {"nll": total / count, "sample_nll": sample_nll, "nfe_per_token": nfe, "train_s": train_s,
            "sample_s": sample_s}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["ar", "bd3_4", "bd3_16", "mdlm"])
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
    p.add_argument("--strategy", default="low_confidence_static", help="the diffusion arms' commit strategy "
                   "(L'/2 passes per block; first_hitting: one token per pass, NFE = L)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
            print(f"seed {seed} {arm:7s} nll {r['nll']:.4f}  sample_nll {r['sample_nll']:.4f}  "
                  f"nfe/token {r['nfe_per_token']:.2f}  train {r['train_s']:.0f}s  sample {r['sample_s']:.1f}s", flush=True)
    print("\n| arm | held-out NLL (nats/token) | sample NLL under the chain | NFE/token | train s/run |")
    print("|---|---:|---:|---:|---:|")
    for arm, rs in results.items():
        def ms(key):
            v = [r[key] for r in rs]
            return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"
        print(f"| {arm} | {ms('nll')} | {ms('sample_nll')} | {rs[0]['nfe_per_token']:.2f} | "
              f"{statistics.mean(r['train_s'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
