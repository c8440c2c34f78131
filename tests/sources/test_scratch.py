"""The sources that need no files: synthetic order-2 Markov text and a model built from its config."""
import math

import torch

from blocktrain.trainer.sources.data import build_datasets
from blocktrain.trainer.sources.models import load_model
from blocktrain.trainer.sources.scratch import MarkovChain


def test_markov_entropy_rate_matches_sampled_nll():
    chain = MarkovChain(16, 0.2, seed=3)
    x = chain.sample(2000, 40, torch.Generator().manual_seed(0))
    nll = float(-chain.log_likelihood(x).sum() / (2000 * 38))
    assert abs(nll - chain.entropy_rate) < 0.02 * chain.entropy_rate
    assert 0 < chain.entropy_rate < math.log(16)
    counts = torch.bincount(x[:, 0] * 16 + x[:, 1], minlength=256).double() / 2000  # starts from the stationary law
    assert (counts - chain.pi.flatten()).abs().max() < 0.03


def test_markov_floor_after_the_first_token():
    """The floor of tokens 1.. given token 0 (what a model that never scores position 0 can reach) equals the
    sampled NLL of those tokens; it is not the whole-sequence floor rescaled by L / (L - 1)."""
    chain = MarkovChain(16, 0.1, seed=0)
    x = chain.sample(4000, 8, torch.Generator().manual_seed(0))
    first = chain.pi.sum(1)
    second = chain.pi / first[:, None]  # p(x1 | x0)
    nll = -(second[x[:, 0], x[:, 1]].log().sum() + chain.log_likelihood(x).sum()) / (4000 * 7)
    floor = chain.nll_floor(8, skip_first=True)
    assert abs(float(nll) - floor) < 0.02 * floor
    assert floor < chain.nll_floor(8) * 8 / 7 - 0.2  # the rescaled whole-sequence floor counts token 0's entropy


def test_markov_data_kind_through_build_datasets():
    data = build_datasets({"kind": "markov", "vocab_size": 8, "seq_len": 12, "num_train": 40, "num_val": 8,
                           "batch_size": 4}, seed=1)
    item = data.train[0]
    assert item["input_ids"].shape == (12,) and int(item["input_ids"].max()) < 8
    assert data.info["alphabet"] == "abcdefgh" and data.info["vocab_size"] == 8
    chain = MarkovChain(8, 0.1, 0)
    assert data.info["entropy_rate"] == chain.entropy_rate  # the chain is fixed by chain_seed, not the run seed
    again = build_datasets({"kind": "markov", "vocab_size": 8, "seq_len": 12, "num_train": 40, "num_val": 8}, seed=2)
    assert not torch.equal(again.train.tokens, data.train.tokens)
    assert data.train.log_likelihood(data.train.tokens[:2]).shape == (2,)


def test_model_built_from_config():
    loaded = load_model({"kind": "transformers_config", "model_type": "qwen2",
                         "config": {"vocab_size": 20, "hidden_size": 16, "intermediate_size": 32,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}})
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM" and loaded.tokenizer is None
    assert loaded.model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 20)
