"""lm-eval tasks in the evaluate stage (skipped without lm-eval): a local multiple-choice task scored on the
pruned model equals the accuracy computed by hand from its log-likelihoods."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.run import run
from tests.helpers import read_metrics

from .conftest import llm_args

ROWS = [{"question": f"the {a} brown", "choices": [" fox", " dog", " films"], "label": i % 3}
        for i, a in enumerate(["quick", "lazy", "tiny", "good", "bad", "muddy", "a", "the"])]


def task_folder(root):
    root.mkdir()
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (root / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def accuracy_by_hand(model, tokenizer) -> float:
    correct = 0
    for row in ROWS:
        scores = []
        for choice in row["choices"]:
            context = tokenizer(row["question"])["input_ids"]
            ids = tokenizer(row["question"] + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(context), len(ids))))
        correct += int(max(range(3), key=scores.__getitem__) == row["label"])
    return 100.0 * correct / len(ROWS)


def test_lm_eval_task_scores_the_pruned_model(llama_dir, corpus, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = task_folder(tmp_path / "tasks")
    run(load_config(llm_args("magnitude_llm", llama_dir, corpus, tmp_path / "run", "plugin.magnitude.lm_eval.tasks=[tiny_choice]",
                             f"plugin.magnitude.lm_eval.include_path={tasks}", "plugin.magnitude.lm_eval.batch_size=4")))
    metrics = read_metrics(tmp_path / "run")["metrics"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / "model").eval()
    want = accuracy_by_hand(model, AutoTokenizer.from_pretrained(llama_dir))
    assert metrics["lm_eval/tiny_choice"] == pytest.approx(want) and metrics["lm_eval/mean_acc"] == pytest.approx(want)


def test_lm_eval_tasks_without_lm_eval_fail_before_pruning(llama_dir, corpus, tmp_path, monkeypatch):
    import importlib.util

    from blocktrain.trainer.errors import UserError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    with pytest.raises(UserError, match=r"plugin.wanda.lm_eval.tasks needs the lm-evaluation-harness: pip install lm-eval"):
        run(load_config(llm_args("wanda_llm", llama_dir, corpus, tmp_path / "run", "plugin.wanda.lm_eval.tasks=[boolq]")))
    assert not (tmp_path / "run" / "state").exists()
