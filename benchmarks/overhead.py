"""Per-step overhead of `train` against a plain PyTorch loop: same model, data, optimiser, one process.

    python benchmarks/overhead.py [--steps 150 --warmup 30 --repeats 3]

A small BERT classifier (4 layers, hidden 256) with LoRA on query/value is trained on the same
CSV by (a) a hand-written loop (DataLoader, AdamW, LambdaLR, backward, step) and (b) blocktrain's
`run()` with the `lora_text_classifier` recipe, once with the default W&B (offline) logger and once
with `logger=none`. Steady-state time per step excludes the first `--warmup` steps. The variants are
interleaved `--repeats` times and the median is reported. Target: overhead <= 5%.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from blocktrain.plugins.lora import apply_lora
from blocktrain.trainer.cli import load_config
from blocktrain.trainer.optim import lr_lambda
from blocktrain.trainer.run import run
from blocktrain.trainer.sources.data import build_datasets
from blocktrain.trainer.sources.models import load_model
from blocktrain.trainer.testing import make_wordpiece_tokenizer

WORDS = "good bad happy sad the quick brown fox jumps over lazy dog films make people a tiny model reads".split()


def build_assets(root: Path) -> tuple[Path, Path]:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = make_wordpiece_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(4096):
            words = [rng.choice(WORDS) for _ in range(60)]
            writer.writerow([" ".join(words), int("good" in words)])
    return root / "model", root / "train.csv"


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end, self.steps = time.perf_counter(), trainer.global_step - self.warmup


def args_for(model_dir: Path, data: Path, steps: int, run_dir: Path, logger: str) -> list[str]:
    return ["recipe=lora_text_classifier", f"model.id={model_dir}", f"data.train={data}", "data.val_fraction=0.01",
            "data.batch_size=32", "data.max_length=64", f"trainer.max_steps={steps}", "trainer=cpu", "stages=[fit]",
            f"logger={logger}", f"run_dir={run_dir}", "checkpoint.every_n_steps=1000000", "scheduler.warmup_steps=10"]


def time_blocktrain(cfg_args: list[str], warmup: int) -> float:
    timer = StepTimer(warmup)
    run(load_config(cfg_args), extra_callbacks=[timer])
    return (timer.end - timer.start) / timer.steps


def time_plain(cfg_args: list[str], steps: int, warmup: int) -> float:
    """The same run written by hand: what blocktrain does, without the framework."""
    cfg = load_config(cfg_args)
    from blocktrain.trainer.resolvers import set_data_info
    from blocktrain.trainer.sources.models import load_processor

    pl.seed_everything(cfg.seed, verbose=False)
    tokenizer = load_processor(cfg.model)
    datasets = build_datasets(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    set_data_info(datasets.info)
    model = load_model(cfg.model, processor=tokenizer).model
    lora = cfg.plugin.lora
    apply_lora(model, targets=list(lora.targets), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
               modules_to_save=list(lora.modules_to_save))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler.kind, cfg.scheduler.warmup_steps,
                                                                      steps, 0.0))
    loader = torch.utils.data.DataLoader(datasets.train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=datasets.collate_fn)
    step, start = 0, 0.0
    while step < steps:
        for batch in loader:
            if step == warmup:
                start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = build_assets(root)
        times: dict[str, list[float]] = {"plain PyTorch loop": [], "train (logger=wandb offline)": [],
                                         "train (logger=none)": []}
        for r in range(opts.repeats):
            times["plain PyTorch loop"].append(time_plain(args_for(model_dir, data, opts.steps, root / f"p{r}", "none"),
                                                          opts.steps, opts.warmup))
            for logger, key in (("wandb", "train (logger=wandb offline)"), ("none", "train (logger=none)")):
                args = args_for(model_dir, data, opts.steps, root / f"{logger}{r}", logger)
                times[key].append(time_blocktrain(args, opts.warmup))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, malloc: {'jemalloc' if 'jemalloc' in os.environ.get('LD_PRELOAD', '') else 'glibc'}")
    print(f"steps {opts.steps} (first {opts.warmup} excluded), repeats {opts.repeats}, batch 32 x 64 tokens")
    base = statistics.median(times["plain PyTorch loop"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:32s} {med * 1e3:8.2f} ms/step  overhead {100 * (med / base - 1):+6.2f}%   "
              f"runs: {', '.join(f'{v * 1e3:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
