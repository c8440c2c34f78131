"""Evaluation for compressed models: perplexity over held-out windows and lm-evaluation-harness tasks.

Perplexity is exp(mean NLL) over the tokens the windows score: the text corpus source marks, in each
held-out window, the tokens an earlier window already scored (labels -100), so with ``data.stride`` <
``data.seq_len`` every token is scored once, with up to ``seq_len - 1`` tokens of context (the standard
sliding-window perplexity). Top-1 accuracy of image classifiers is the ``image_classification`` task's.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from blocktrain.trainer.compression.calibration import to_device
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.tasks.language import token_nll

__all__ = ["perplexity", "require_lm_eval", "lm_eval_scores"]


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: Dataset, batch_size: int = 8,
               device: torch.device | str | None = None) -> dict[str, float]:
    """``{"loss": mean token NLL, "ppl": exp(loss), "tokens": tokens scored}`` of a causal LM over ``windows``
    (items ``{"input_ids", "labels"}``, labels -100 where not scored)."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for batch in DataLoader(windows, batch_size=batch_size, shuffle=False):
        nll, n = token_nll(model, to_device(batch, device))
        total += float(nll)
        count += n
    if count == 0:
        raise ValueError("the windows score no tokens")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def require_lm_eval(where: str) -> None:
    """A clear error, before any long work, when lm-eval tasks are asked for but lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"{where}.tasks needs the lm-evaluation-harness: pip install lm-eval "
                        f"(or set {where}.tasks=[])")


def lm_eval_scores(model: torch.nn.Module, tokenizer, tasks: list[str], num_fewshot: int = 0, batch_size: int = 8,
                   limit: float | None = None, include_path: str | None = None) -> dict[str, float]:
    """Zero/few-shot lm-eval accuracies ×100 (``acc,none``, as iCBS reports them) per task and their mean;
    ``include_path`` adds a folder of task YAMLs to the harness's own tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(Path(include_path).expanduser())) if include_path else None
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager)["results"]
    scores = {f"lm_eval/{task}": 100.0 * float(results[task]["acc,none"]) for task in tasks if "acc,none" in results[task]}
    missing = [task for task in tasks if f"lm_eval/{task}" not in scores]
    if missing:
        raise UserError(f"lm-eval task(s) {', '.join(missing)} report no 'acc,none' metric")
    scores["lm_eval/mean_acc"] = sum(scores.values()) / len(scores)
    return scores
