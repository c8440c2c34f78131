"""Shared fixtures: no network, W&B offline and quiet, tiny real models saved to disk (a BERT classifier with a
sentiment CSV, a Llama causal LM with a text corpus)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_SILENT": "true",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("WANDB_MODE", None)  # the config's default (offline) must be what the tests see

ONE_THREAD = ("compression", "quantization", "plugins/lpvit")  # folders of toy-model tests run on one thread
POSITIVE, NEGATIVE = ("good", "happy"), ("bad", "sad")
FILLER = "the quick brown fox jumps over lazy dog films make people a tiny model reads".split()


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tests under the ``ONE_THREAD`` folders run on one intra-op thread: their toy models run faster (thread
    start-up dominates tiny matmuls)."""
    import torch

    folder = Path(request.path).resolve().relative_to(Path(__file__).resolve().parent).as_posix()
    if not folder.startswith(tuple(f + "/" for f in ONE_THREAD)):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sentiment_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Learnable text classification: the label is which sentiment word the sentence contains."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, 6) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT sequence classifier (2 labels, no dropout) and its tokenizer, saved locally."""
    from blocktrain.trainer.testing import save_tiny_bert

    path = tmp_path_factory.mktemp("tiny_bert")
    model, _ = save_tiny_bert(path, num_labels=2)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> tuple[Path, Path]:
    """(train.csv, val.csv) with columns text,label."""
    import csv

    root = tmp_path_factory.mktemp("sentiment")
    paths = []
    for name, n, seed in (("train.csv", 96, 0), ("val.csv", 32, 1)):
        with open(root / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(sentiment_rows(n, seed))
        paths.append(root / name)
    return paths[0], paths[1]


@pytest.fixture
def lora_args(tiny_bert_dir, sentiment_csv, tmp_path) -> list[str]:
    """Overrides that run `lora_text_classifier` on the tiny local BERT for a few CPU steps."""
    train_csv, val_csv = sentiment_csv
    return ["recipe=lora_text_classifier", f"model.id={tiny_bert_dir}", f"data.train={train_csv}",
            f"data.val={val_csv}", f"run_dir={tmp_path / 'run'}", "trainer=cpu", "trainer.max_steps=12",
            "trainer.val_check_interval=6", "trainer.log_every_n_steps=1", "data.batch_size=8",
            "checkpoint.every_n_steps=4", "scheduler.warmup_steps=0", "optim.lr=3e-3"]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama causal LM, its tokenizer, and the same model as ``tiny.gguf``, saved locally."""
    from blocktrain.trainer.testing import save_tiny_llama, write_llama_gguf

    path = tmp_path_factory.mktemp("tiny_llama")
    model, tokenizer = save_tiny_llama(path)
    write_llama_gguf(path / "tiny.gguf", model, tokenizer)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from blocktrain.trainer.testing import CORPUS

    path = tmp_path_factory.mktemp("corpus") / "book.txt"
    sentences = CORPUS.split(" . ")
    path.write_text("".join(f"{sentences[(i * 7) % len(sentences)]} . " for i in range(300)))
    return path
