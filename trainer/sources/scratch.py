"""The sources of ``scratch_config``: the synthetic Markov text and the model built from its config."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.data import Datasets
from blocktrain.trainer.sources.models import LoadedModel, ModelSource
from blocktrain.trainer.sources.scratch_config import ALPHABET


class MarkovChain:
    """An order-2 chain ``P[a, b, c] = p(x_i = c | x_{i-2} = a, x_{i-1} = b)`` and its stationary pair law."""

    def __init__(self, vocab_size: int, alpha: float, seed: int):
        rng = np.random.default_rng(seed)
        p = rng.dirichlet(np.full(vocab_size, alpha), size=(vocab_size, vocab_size))
        self.P = torch.tensor(np.maximum(p, 1e-300), dtype=torch.float64)
        self.P /= self.P.sum(-1, keepdim=True)
        pi = torch.full((vocab_size, vocab_size), 1.0 / vocab_size ** 2, dtype=torch.float64)
        for _ in range(10000):  # power iteration on the pair chain (a, b) -> (b, c)
            new = torch.einsum("ab,abc->bc", pi, self.P)
            done = (new - pi).abs().max() < 1e-13
            pi = new
            if done:
                break
        self.pi = pi / pi.sum()
        plogp = (self.P * self.P.log()).sum(-1)
        self.entropy_rate = float(-(self.pi * plogp).sum())  # nats per token
        self.pair_entropy = float(-(self.pi * self.pi.clamp_min(1e-300).log()).sum())

    def nll_floor(self, length: int, skip_first: bool = False) -> float:
        """The expected NLL per token (nats) of a stationary sequence of ``length`` tokens under the chain; with
        ``skip_first``, of tokens 1.. given token 0 (what a model that never predicts the first token is scored on)."""
        if not skip_first:
            return (self.pair_entropy + (length - 2) * self.entropy_rate) / length
        first = self.pi.sum(1)
        first_entropy = float(-(first * first.clamp_min(1e-300).log()).sum())
        return (self.pair_entropy - first_entropy + (length - 2) * self.entropy_rate) / (length - 1)

    def sample(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        v = self.P.shape[0]
        first = torch.multinomial(self.pi.flatten(), n, replacement=True, generator=generator)
        u = torch.rand(n, length, 1, dtype=torch.float64, generator=generator)
        cdf = self.P.cumsum(-1)
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0], x[:, 1] = first // v, first % v
        for i in range(2, length):  # inverse-CDF draw of each next symbol
            x[:, i] = torch.searchsorted(cdf[x[:, i - 2], x[:, i - 1]], u[:, i].contiguous()).clamp(max=v - 1)[:, 0]
        return x

    def log_likelihood(self, tokens: torch.Tensor, start: int = 2) -> torch.Tensor:
        """Per row, the summed log-probability of tokens ``start..`` (``start >= 2``) given the ones before."""
        start = max(start, 2)
        a, b, c = tokens[:, start - 2:-2], tokens[:, start - 1:-1], tokens[:, start:]
        return self.P[a, b, c].log().sum(1)


class MarkovTexts(Dataset):
    """Sequences of a ``MarkovChain``; items ``{"input_ids": x, "labels": x}``; ``log_likelihood`` scores any
    token rows under the true chain (the sampler's exact quality measure)."""

    def __init__(self, tokens: torch.Tensor, chain: MarkovChain):
        self.tokens, self.chain = tokens, chain

    def __len__(self):
        return self.tokens.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}

    def log_likelihood(self, tokens: torch.Tensor, start: int = 2) -> torch.Tensor:
        return self.chain.log_likelihood(tokens, start)


def build_markov(cfg, tokenizer, seed) -> Datasets:
    chain = MarkovChain(cfg.vocab_size, cfg.alpha, cfg.chain_seed)
    g = torch.Generator().manual_seed(seed)
    train = chain.sample(cfg.num_train, cfg.seq_len, g)
    val = chain.sample(cfg.num_val, cfg.seq_len, g)
    alphabet = ALPHABET[:cfg.vocab_size] if cfg.vocab_size <= len(ALPHABET) else ""
    info = {"seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size, "entropy_rate": chain.entropy_rate,
            "nll_floor": chain.nll_floor(cfg.seq_len), "ppl_floor": math.exp(chain.nll_floor(cfg.seq_len)),
            "nll_floor_after_first": chain.nll_floor(cfg.seq_len, skip_first=True),
            "alphabet": alphabet}
    return Datasets(train=MarkovTexts(train, chain), val=MarkovTexts(val, chain), collate_fn=None, info=info)


def _load_from_config(cfg, processor) -> LoadedModel:
    import transformers

    try:
        config = transformers.AutoConfig.for_model(cfg.model_type, **dict(cfg.config))
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot build a '{cfg.model_type}' config from model.config: {e}") from e
    model_cls = getattr(transformers, cfg.auto_class, None)
    if model_cls is None or not hasattr(model_cls, "from_config"):
        raise UserError(f"model.auto_class={cfg.auto_class} is not a transformers Auto class with from_config")
    model = model_cls.from_config(config, dtype=getattr(torch, cfg.dtype))
    info = {"kind": cfg.kind, "model_type": cfg.model_type, "class": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters())}
    return LoadedModel(model=model, tokenizer=processor, source=f"config:{cfg.model_type}", info=info)


def _tokenizer(cfg):
    if cfg.tokenizer is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.tokenizer)


FROM_CONFIG = ModelSource(_load_from_config, _tokenizer)
