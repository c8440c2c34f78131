"""benchmarks/block_diffusion.py (a): the clip search moves the training interval of the arms it is asked for
only, and every sampler strategy samples the same trained model with its own NFE."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
STRATEGIES = ["low_confidence_static", "first_hitting", "ddpm", "entropy_bounded", "confidence_threshold"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("block_diffusion_benchmark", ROOT / "benchmarks" / "block_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(bench):
    args = argparse.Namespace(vocab=8, hidden=16, layers=1, seq_len=16, lr=1e-3, batch=4, steps=5, samples=2,
                              clip_search_arms=["bd3_4"], clip_every=2, clip_batches=1, clip_widths=[0.5, 0.9],
                              clip_delta=0.1, strategies=STRATEGIES, nfe_per_token=[0.5], threshold=0.9, sub_block=4,
                              eval_draws=1)
    chain = bench.MarkovChain(args.vocab, 0.1, 0)
    data = chain.sample(24, args.seq_len, torch.Generator().manual_seed(0))
    return args, chain, data[:16], data[16:]


def test_clip_search_moves_the_training_interval_of_its_arms_only(bench, setup, monkeypatch):
    args, chain, train, val = setup
    drawn = []
    real = bench.sample_t
    monkeypatch.setattr(bench, "sample_t", lambda *a, **kw: drawn.append((kw["eps_min"], kw["eps_max"])) or real(*a, **kw))
    args = argparse.Namespace(**{**vars(args), "strategies": ["ddpm"]})
    searched = bench.run_arm("bd3_4", 0, chain, train, val, args)
    windows = bench.ClipSearch(1e-3, args.clip_widths, args.clip_delta, 1).windows
    assert [c["step"] for c in searched["searches"]] == [2, 4]
    assert searched["eps"] == searched["searches"][-1]["eps"] and searched["eps"] in windows
    assert all(c["var"] <= c["var_full"] for c in searched["searches"])  # the chosen one is the minimum
    training = drawn[:args.steps]  # the training draws come first, then the variance estimates
    assert training[:2] == [(1e-3, 1.0)] * 2 and training[2:4] == [searched["searches"][0]["eps"]] * 2
    assert training[4] == searched["eps"]
    assert searched["seq_var_trained"] != searched["seq_var_full"]

    drawn.clear()
    plain = bench.run_arm("bd3_16", 0, chain, train, val, args)
    assert plain["searches"] == [] and plain["eps"] == (1e-3, 1.0)
    assert set(drawn) == {(1e-3, 1.0)} and plain["seq_var_trained"] == plain["seq_var_full"]


def test_every_strategy_samples_with_its_own_nfe(bench, setup):
    args, chain, train, val = setup
    r = bench.run_arm("bd3_4", 0, chain, train, val, argparse.Namespace(**{**vars(args), "steps": 1}))
    assert list(r["samples"]) == STRATEGIES
    nfe = {s: q["nfe_per_token"] for s, q in r["samples"].items()}
    assert nfe["low_confidence_static"] == 0.5 and nfe["first_hitting"] == 1.0  # L'/2 passes / one per pass
    assert nfe["ddpm"] <= 0.5 and nfe["entropy_bounded"] <= 0.5  # DDPM caching skips passes that change nothing
    assert 0.25 <= nfe["confidence_threshold"] <= 1.0
    assert r["samples"]["low_confidence_static"]["tokens_per_step"] == 2.0  # each row commits 2 per pass
    assert all(q["tokens_per_step"] >= 1 / q["nfe_per_token"] - 1e-9 for q in r["samples"].values())  # rows <= batch
    assert all(q["sample_nll"] > 0 for q in r["samples"].values())
    ar = bench.run_arm("ar", 0, chain, train, val, argparse.Namespace(**{**vars(args), "steps": 1}))
    assert list(ar["samples"]) == ["ar"] and ar["samples"]["ar"]["nfe_per_token"] == 1.0 and "seq_var_full" not in ar


def test_eval_draws_average_the_bound(bench, setup):
    """Two draws: the mean of the first draw (the one-draw result) and an independent second one."""
    args, chain, train, val = setup
    kw = {**vars(args), "steps": 1, "strategies": ["ddpm"]}
    one = bench.run_arm("mdlm", 0, chain, train, val, argparse.Namespace(**kw))["nll"]
    two = bench.run_arm("mdlm", 0, chain, train, val, argparse.Namespace(**{**kw, "eval_draws": 2}))["nll"]
    assert two != one and abs(two - one) < 0.5 * one


def test_fixed_pass_strategies_sample_at_each_nfe_fraction(bench, setup):
    """Several ``--nfe-per-token``: the fixed-pass strategies once per fraction (named by it), the step-free ones once."""
    args, chain, train, val = setup
    kw = {**vars(args), "steps": 1, "strategies": ["low_confidence_static", "first_hitting"], "nfe_per_token": [0.25, 1]}
    r = bench.run_arm("bd3_4", 0, chain, train, val, argparse.Namespace(**kw))
    assert list(r["samples"]) == ["low_confidence_static@0.25", "low_confidence_static@1", "first_hitting"]
    assert r["samples"]["low_confidence_static@0.25"]["nfe_per_token"] == 0.25  # 1 pass per 4-token block
    assert r["samples"]["low_confidence_static@1"]["nfe_per_token"] == 1.0
    assert r["samples"]["low_confidence_static@1"]["tokens_per_step"] == 1.0
