"""Sources that need no files: a synthetic order-2 Markov text (``data.kind=markov``) with a known entropy rate,
and a transformers model built from its config with fresh weights (``model.kind=transformers_config``).

Registered like every built-in kind; this module imports no torch (the sources live in ``scratch.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from blocktrain.trainer.registry import register_data_kind, register_model_source
from blocktrain.trainer.sources.config import POSITIVE, DataConfig, choices

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"  # how symbols are shown as text


@dataclass
class MarkovDataConfig(DataConfig):
    """Sequences from a random order-2 Markov chain over ``vocab_size`` symbols, p(c | a, b) ~ Dirichlet(alpha).
    The chain is fixed by ``chain_seed``; the run's seed draws the sequences. Its exact entropy rate and
    per-sequence NLL floor are reported in the data info, and samples are scored under the true chain."""

    kind: str = "markov"
    batch_size: int = field(default=32, metadata=POSITIVE)
    vocab_size: int = field(default=32, metadata={"check": (lambda v: 2 <= v <= 1024, "in [2, 1024]")})
    alpha: float = field(default=0.1, metadata=POSITIVE)  # Dirichlet concentration: small = low entropy
    chain_seed: int = 0
    seq_len: int = field(default=64, metadata={"check": (lambda v: v >= 3, "at least 3")})
    num_train: int = field(default=4096, metadata=POSITIVE)
    num_val: int = field(default=256, metadata=POSITIVE)


@dataclass
class TransformersConfigModelConfig:
    """A transformers model with fresh weights: ``<auto_class>.from_config(AutoConfig.for_model(model_type,
    **config))`` (e.g. a small Llama trained from scratch). No tokenizer unless ``tokenizer`` names one."""

    kind: str = "transformers_config"
    model_type: str = "llama"
    auto_class: str = "AutoModelForCausalLM"
    config: Dict[str, Any] = field(default_factory=dict)  # config fields, e.g. hidden_size, num_hidden_layers
    dtype: str = field(default="float32", metadata=choices("float32", "bfloat16", "float16"))
    tokenizer: Optional[str] = None  # hub id or local dir of a tokenizer; null = none (ids only)


register_data_kind("markov", MarkovDataConfig, "blocktrain.trainer.sources.scratch:build_markov",
                   "synthetic order-2 Markov text with a known entropy rate")
register_model_source("transformers_config", TransformersConfigModelConfig,
                      "blocktrain.trainer.sources.scratch:FROM_CONFIG", "a transformers model built from its config")
