"""Tiny real models and calibration data for the pruning cores."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blocktrain.kernels import _qubo_anneal_c

VOCAB = 128


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The annealer's C loop loader as on a new machine: empty cache, nothing built or tried yet."""
    monkeypatch.setenv("BLOCKTRAIN_CACHE", str(tmp_path))
    _qubo_anneal_c._library.cache_clear()
    yield tmp_path
    _qubo_anneal_c._library.cache_clear()  # later tests build into their own cache again


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, MLP 64, 4 heads, 2 KV heads) with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(config).eval()


def token_batches(n: int, batch_size: int = 4, seq_len: int = 16, seed: int = 1) -> list[dict]:
    """``n`` batches of random token ids."""
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)} for _ in range(n)]


def input_square_sums_by_hand(model, name: str, batches) -> torch.Tensor:
    """Σ over every calibration token of x² per input feature of layer ``name`` (one full forward per batch)."""
    sums = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, args, out: sums.append(args[0].detach().double().pow(2).sum(dim=(0, 1))))
    with torch.no_grad():
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    handle.remove()
    return torch.stack(sums).sum(0)


def row_topk_mask_by_hand(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the ``n_keep`` largest scores of each row, written with plain Python sorting."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        for c in sorted(range(len(row)), key=lambda j: row[j], reverse=True)[:n_keep]:
            keep[r, c] = True
    return keep
