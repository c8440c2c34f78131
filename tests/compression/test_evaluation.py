"""Perplexity over held-out windows equals exp(mean token NLL) computed by hand, with and without overlap."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocktrain.trainer.compression.evaluation import perplexity
from blocktrain.trainer.sources.data import build_datasets


def nll_by_hand(model, tokens: list[int], window: int, stride: int, starts: list[int] | None = None) -> tuple[float, int]:
    """Mean NLL over every token of ``tokens`` that some window can predict, each counted once, predicted by the
    earliest window holding it at a position > 0 from that window's earlier tokens (one forward per window)."""
    if starts is None:
        starts = list(range(0, len(tokens) - window + 1, stride))
    scored: dict[int, float] = {}
    for start in starts:
        ids = torch.tensor([tokens[start:start + window]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for pos in range(1, window):
            g = start + pos
            if g not in scored:
                scored[g] = -float(logp[pos - 1, tokens[g]])
    return sum(scored.values()) / len(scored), len(scored)


@pytest.mark.parametrize("seq_len,stride,max_sequences", [(16, 16, None), (16, 5, None), (12, 4, 6)])
def test_perplexity_is_exp_mean_token_nll_by_hand(llama_dir, corpus, seq_len, stride, max_sequences):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    cfg = {"kind": "text_corpus", "files": [str(corpus)], "seq_len": seq_len, "stride": stride, "val_fraction": 0.1,
           "max_sequences": max_sequences, "batch_size": 4}
    data = build_datasets(cfg, tokenizer=tokenizer, seed=3)
    stream = tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tail = stream[len(stream) - int(len(stream) * 0.1):]
    starts = None
    if max_sequences is not None:  # the source keeps a seeded subset of the windows, in stream order
        windows = [data.val[i]["input_ids"].tolist() for i in range(len(data.val))]
        every = list(range(0, len(tail) - seq_len + 1, stride))
        starts = [next(s for s in every if tail[s:s + seq_len] == w) for w in windows]
        assert len(starts) == max_sequences and starts == sorted(set(starts))
    want, count = nll_by_hand(model, tail, seq_len, stride, starts)
    got = perplexity(model, data.val, batch_size=4)
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    if stride < seq_len and max_sequences is None:  # every held-out token after the first is scored once
        last = (len(tail) - seq_len) // stride * stride + seq_len
        assert count == last - 1
