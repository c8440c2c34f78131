"""`train recipe=wanda_llm / icbs_llm / wanda_vit` on tiny local models, as a user runs them: metrics.json,
the sparsity report, iCBS's dL, and an export that reloads with identical outputs and real zeros."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocktrain.trainer.compression.evaluation import perplexity
from blocktrain.trainer.sources.data import build_datasets
from blocktrain.trainer.sources.models import load_model
from tests.helpers import read_metrics, train, wandb_history

from .conftest import ICBS_FAST, llm_args, vit_args


def finished_metrics(result, run_dir) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "finished"
    return metrics["metrics"]


def check_report(metrics: dict, run_dir, names: list[str], density: float) -> None:
    """The per-layer report covers exactly the target layers, at the density asked for."""
    layers = {k.removeprefix("sparsity/density/"): v for k, v in metrics.items() if k.startswith("sparsity/density/")}
    assert sorted(layers) == sorted(names)
    assert all(v == pytest.approx(density) for v in layers.values()) and metrics["sparsity/density"] == pytest.approx(density)
    report = json.loads((run_dir / "sparsity_report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == names
    assert "| **all" in (run_dir / "sparsity_report.md").read_text()
    assert (run_dir / "sparsity_report.png").read_bytes()[:4] == b"\x89PNG"


def check_real_zeros(state: dict[str, torch.Tensor], metrics: dict) -> None:
    for key, weight in state.items():
        name = key.removesuffix(".weight")
        if f"sparsity/density/{name}" in metrics:
            assert weight.count_nonzero().item() / weight.numel() == pytest.approx(metrics[f"sparsity/density/{name}"])


def test_wanda_llm_end_to_end(llama_dir, corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in llm_args("wanda_llm", llama_dir, corpus, run_dir, "plugin.wanda.calibration.samples=16",
                                "data.stride=8") if a != "logger=none"]
    metrics = finished_metrics(train(*args, OMP_NUM_THREADS="1"), run_dir)
    original = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    check_report(metrics, run_dir, names, 0.5)
    assert any(row.get("sparsity/density_chart/_type") == "image-file" and row.get("sparsity/layers/_type") == "table-file"
               and row.get("sparsity/layers/nrows") == len(names) for row in wandb_history(run_dir))

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model").eval()
    check_real_zeros(model.state_dict(), metrics)
    masks = torch.load(run_dir / "state" / "wanda.pt", weights_only=False)["payload"]
    with torch.no_grad():
        for name in names:
            original.get_submodule(name).weight.mul_(masks[name]["mask"])
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    data = build_datasets({"kind": "text_corpus", "files": [str(corpus)], "seq_len": 16, "stride": 8,
                           "val_fraction": 0.2}, tokenizer=AutoTokenizer.from_pretrained(run_dir / "export" / "model"))
    assert perplexity(model, data.val)["ppl"] == pytest.approx(metrics["val/ppl"], rel=1e-5)


def test_icbs_llm_from_gguf_end_to_end(llama_dir, corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = llm_args("icbs_llm", llama_dir, corpus, run_dir, *ICBS_FAST, "model=gguf", "model.gguf_file=tiny.gguf",
                    "data.add_eos=false")  # the tiny GGUF tokenizer comes back without an EOS token
    metrics = finished_metrics(train(*args, OMP_NUM_THREADS="1"), run_dir)
    original = load_model({"kind": "gguf", "id": str(llama_dir), "gguf_file": "tiny.gguf"}).model
    names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    check_report(metrics, run_dir, names, 0.5)
    assert metrics["icbs/steps"] == 8 and metrics["icbs/epochs_done"] == 1 and "val/ppl" in metrics
    saved = torch.load(run_dir / "state" / "icbs.pt", weights_only=False)["payload"]
    assert len(saved["dL_track"]) == 8 and metrics["icbs/dL"] == saved["dL_track"][-1]
    assert metrics["icbs/dL_sum"] == pytest.approx(sum(saved["dL_track"]))
    layer_steps = {n: metrics[f"icbs/steps/{n}"] for n in names}  # the realised allocation, one epoch = its plan
    assert layer_steps == saved["layer_steps"] == {n: saved["plan"].count(n) for n in names}

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model").eval()
    check_real_zeros(model.state_dict(), metrics)
    with torch.no_grad():
        for name in names:
            weight = original.get_submodule(name).weight
            weight.masked_fill_(saved["layers"][name]["pruned"].view_as(weight), 0)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_wanda_vit_end_to_end(vit_checkpoint, images, tmp_path):
    import timm
    from safetensors.torch import load_model as load_safetensors

    run_dir = tmp_path / "run"
    args = vit_args("wanda_vit", vit_checkpoint, images, run_dir, "plugin.wanda.calibration.samples=8",
                    "plugin.wanda.calibration.batch_size=4")
    metrics = finished_metrics(train(*args, OMP_NUM_THREADS="1"), run_dir)
    assert 0.0 <= metrics["val/acc"] <= 1.0

    def vit():
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=2).eval()

    original, model = vit(), vit()
    load_safetensors(original, str(vit_checkpoint))
    load_safetensors(model, str(run_dir / "export" / "model" / "model.safetensors"))
    names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    check_report(metrics, run_dir, names, 0.5)
    check_real_zeros(model.state_dict(), metrics)
    assert torch.equal(model.head.weight, original.head.weight)  # excluded: stays dense
    masks = torch.load(run_dir / "state" / "wanda.pt", weights_only=False)["payload"]
    with torch.no_grad():
        for name in names:
            original.get_submodule(name).weight.mul_(masks[name]["mask"])
    data = build_datasets({"kind": "image_folder", "path": str(images), "image_size": 32, "val_fraction": 0.25,
                           "batch_size": 6})
    x, y = torch.utils.data.default_collate([data.val[i] for i in range(len(data.val))])
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, original(x))
    assert (logits.argmax(-1) == y).float().mean().item() == pytest.approx(metrics["val/acc"])
