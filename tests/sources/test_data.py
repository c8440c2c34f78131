"""Data sources: each kind builds correctly shaped batches; splits are deterministic; mistakes are UserErrors."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils.data import DataLoader

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.data import build_datasets
from blocktrain.trainer.testing import (CORPUS, make_bpe_tokenizer, make_wordpiece_tokenizer, write_food101,
                                    write_image_folder, write_mnist_raw)


@pytest.fixture(scope="module")
def wordpiece():
    return make_wordpiece_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


def _first_batch(data, batch_size=4, split="train"):
    return next(iter(DataLoader(getattr(data, split), batch_size=batch_size, collate_fn=data.collate_fn)))


# -- text classification -----------------------------------------------------------------------
WORDS = CORPUS.split()
LABELS = ["pos", "neg", "meh"]


def _write_jsonl(path, n, labels=LABELS):
    rows = [{"text": " ".join(WORDS[i % 20: i % 20 + 3 + i % 7]), "label": labels[i % len(labels)], "id": i}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _write_csv(path, rows, fields=("text", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_text_classification_batches_and_string_labels(tmp_path, wordpiece):
    rows = _write_jsonl(tmp_path / "train.jsonl", 30)
    data = build_datasets({"kind": "text_classification", "train": str(tmp_path / "train.jsonl"), "batch_size": 4,
                           "val_fraction": 0.2, "max_length": 8}, tokenizer=wordpiece, seed=0)
    assert data.info["class_names"] == ["meh", "neg", "pos"] and data.info["num_labels"] == 3
    assert data.info["num_train"] == 24 and data.info["num_val"] == 6 and data.info["seq_len"] == 8
    train_labels = [data.train[i]["labels"] for i in range(len(data.train))] + \
                   [data.val[i]["labels"] for i in range(len(data.val))]
    assert sorted(train_labels) == sorted(["meh", "neg", "pos"].index(r["label"]) for r in rows)
    batch = _first_batch(data)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = [len(data.train[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == wordpiece.pad_token_id).all()
    assert max(len(data.train[i]["input_ids"]) for i in range(len(data.train))) <= 8
    first = data.train[0]
    text = [r for r in rows if r["label"] == data.info["class_names"][first["labels"]]]
    assert any(wordpiece(r["text"], truncation=True, max_length=8)["input_ids"] == first["input_ids"] for r in text)


def test_text_classification_split_is_deterministic_by_seed(tmp_path, wordpiece):
    _write_jsonl(tmp_path / "train.jsonl", 40)
    cfg = {"kind": "text_classification", "train": str(tmp_path / "train.jsonl"), "batch_size": 2, "val_fraction": 0.25}

    def val_items(seed):
        data = build_datasets(cfg, tokenizer=wordpiece, seed=seed)
        return [(tuple(data.val[i]["input_ids"]), data.val[i]["labels"]) for i in range(len(data.val))]

    assert val_items(0) == val_items(0)
    assert val_items(0) != val_items(1)
    assert len(val_items(3)) == 10


def test_text_classification_csv_val_file_and_int_labels(tmp_path, wordpiece):
    _write_csv(tmp_path / "train.csv", [{"text": "good films", "label": "2"}, {"text": "bad films", "label": "0"},
                                         {"text": "the fox", "label": "0"}])
    _write_csv(tmp_path / "val.csv", [{"text": "lazy dog", "label": "2"}])
    data = build_datasets({"kind": "text_classification", "train": str(tmp_path / "train.csv"),
                           "val": str(tmp_path / "val.csv"), "batch_size": 3}, tokenizer=wordpiece)
    assert data.info["class_names"] == ["0", "1", "2"] and data.info["num_labels"] == 3
    assert [data.train[i]["labels"] for i in range(3)] == [2, 0, 0] and data.val[0]["labels"] == 2
    assert _first_batch(data, 3)["labels"].tolist() == [2, 0, 0]


def test_text_classification_errors(tmp_path, wordpiece):
    _write_jsonl(tmp_path / "train.jsonl", 10)
    base = {"kind": "text_classification", "train": str(tmp_path / "train.jsonl"), "batch_size": 2}
    with pytest.raises(UserError, match="needs the model's tokenizer"):
        build_datasets(base)
    with pytest.raises(UserError, match=r"^data path not found: /no/train.csv \(data.train\)"):
        build_datasets({**base, "train": "/no/train.csv"}, tokenizer=wordpiece)
    with pytest.raises(UserError, match=r"has no field 'sentence' \(data.text_field\); fields: text, label, id"):
        build_datasets({**base, "text_field": "sentence"}, tokenizer=wordpiece)
    _write_jsonl(tmp_path / "val.jsonl", 3, labels=["pos", "great"])
    with pytest.raises(UserError, match="label 'great' is not one of the train labels"):
        build_datasets({**base, "val": str(tmp_path / "val.jsonl")}, tokenizer=wordpiece)
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(UserError, match=r"^no records in .*empty.csv \(data.train\)"):
        build_datasets({**base, "train": str(tmp_path / "empty.csv")}, tokenizer=wordpiece)
    (tmp_path / "train.parquet").write_text("x")
    with pytest.raises(UserError, match="unsupported file type '.parquet'"):
        build_datasets({**base, "train": str(tmp_path / "train.parquet")}, tokenizer=wordpiece)
    with pytest.raises(UserError, match=r"train split has 9 samples, fewer than one batch \(data.batch_size=16\)"):
        build_datasets({**base, "batch_size": 16}, tokenizer=wordpiece)


# -- text corpus -------------------------------------------------------------------------------
@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "books" / "sub").mkdir(parents=True)
    (tmp_path / "books" / "a.txt").write_text(CORPUS * 6)
    (tmp_path / "books" / "sub" / "b.txt").write_text("\n".join(reversed(CORPUS.split(" . "))) * 6)
    (tmp_path / "books" / "notes.md").write_text("not part of the corpus")
    return tmp_path / "books"


def test_text_corpus_chunks_the_token_stream(corpus_dir, bpe):
    data = build_datasets({"kind": "text_corpus", "files": [str(corpus_dir)], "seq_len": 16, "batch_size": 4,
                           "val_fraction": 0.1}, tokenizer=bpe)
    stream = []
    for f in (corpus_dir / "a.txt", corpus_dir / "sub" / "b.txt"):
        stream += bpe(f.read_text(), add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    n_val = int(len(stream) * 0.1)
    head, tail = stream[:len(stream) - n_val], stream[len(stream) - n_val:]
    assert data.info["num_files"] == 2 and data.info["num_tokens"] == len(stream)
    assert len(data.train) == len(head) // 16 and len(data.val) == len(tail) // 16
    assert [data.train[i]["input_ids"].tolist() for i in range(len(data.train))] == \
           [head[i * 16:(i + 1) * 16] for i in range(len(head) // 16)]
    assert data.val[0]["input_ids"].tolist() == tail[:16]
    batch = _first_batch(data)
    assert batch["input_ids"].shape == (4, 16) and torch.equal(batch["labels"], batch["input_ids"])


def test_text_corpus_stride_max_sequences_and_seed(corpus_dir, bpe):
    cfg = {"kind": "text_corpus", "files": [str(corpus_dir / "**" / "*.txt")], "seq_len": 12, "stride": 4,
           "val_fraction": 0.0, "batch_size": 2}
    full = build_datasets(cfg, tokenizer=bpe)
    assert full.val is None
    assert torch.equal(full.train[1]["input_ids"][:8], full.train[0]["input_ids"][4:])  # overlapping windows

    def picked(seed):
        data = build_datasets({**cfg, "max_sequences": 5}, tokenizer=bpe, seed=seed)
        return [data.train[i]["input_ids"].tolist() for i in range(len(data.train))]

    assert len(picked(0)) == 5 and picked(0) == picked(0) and picked(0) != picked(1)
    windows = [full.train[i]["input_ids"].tolist() for i in range(len(full.train))]
    assert all(w in windows for w in picked(1))


def test_text_corpus_errors(tmp_path, corpus_dir, bpe):
    cfg = {"kind": "text_corpus", "seq_len": 16, "batch_size": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no files matching '\*\*/\*.txt' in directory .*empty"):
        build_datasets({**cfg, "files": [str(tmp_path / "empty")]}, tokenizer=bpe)
    with pytest.raises(UserError, match=r"no files match .*\*.csv \(data.files\)"):
        build_datasets({**cfg, "files": [str(corpus_dir / "*.csv")]}, tokenizer=bpe)
    with pytest.raises(UserError, match=r"^data path not found: /no/corpus.txt \(data.files\)"):
        build_datasets({**cfg, "files": ["/no/corpus.txt"]}, tokenizer=bpe)
    (tmp_path / "short.txt").write_text("the fox")
    with pytest.raises(UserError, match=r"short.txt has \d+ training tokens, fewer than one sequence of data.seq_len=16"):
        build_datasets({**cfg, "files": [str(tmp_path / "short.txt")]}, tokenizer=bpe)
    with pytest.raises(UserError, match="held-out tail .* fewer than one sequence"):
        build_datasets({**cfg, "files": [str(corpus_dir / "a.txt")], "seq_len": 64, "val_fraction": 0.01}, tokenizer=bpe)


# -- images ------------------------------------------------------------------------------------
def test_torchvision_train_flag_dataset(tmp_path):
    write_mnist_raw(tmp_path, "FashionMNIST", n_train=40, n_test=12)
    data = build_datasets({"kind": "torchvision", "name": "FashionMNIST", "root": str(tmp_path), "download": False,
                           "batch_size": 8, "image_size": 32, "channels": 3, "mean": [0.5], "std": [0.25]})
    assert data.info["num_train"] == 40 and data.info["num_val"] == 12 and data.info["num_labels"] == 10
    assert data.info["class_names"][0] == "T-shirt/top"
    images, labels = _first_batch(data, 8)
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == list(range(8))
    raw = torch.from_numpy(data.train.data[0].numpy()).float() / 255
    native = build_datasets({"kind": "torchvision", "name": "FashionMNIST", "root": str(tmp_path), "download": False,
                             "batch_size": 8, "mean": [0.5], "std": [0.25]})
    torch.testing.assert_close(native.train[0][0], ((raw - 0.5) / 0.25)[None])  # normalisation, native 28x28


def test_torchvision_split_dataset_and_held_out_fraction(tmp_path):
    write_food101(tmp_path, per_split=3)
    data = build_datasets({"kind": "torchvision", "name": "Food101", "root": str(tmp_path), "download": False,
                           "batch_size": 2, "image_size": 16})
    assert data.info["class_names"] == ["apple_pie", "bibimbap"] and len(data.train) == len(data.val) == 6
    assert _first_batch(data, 2)[0].shape == (2, 3, 16, 16)
    fake = {"kind": "torchvision", "name": "FakeData", "val_split": None, "val_fraction": 0.3, "batch_size": 2,
            "kwargs": {"size": 10, "image_size": [3, 8, 8], "num_classes": 4}}
    split = build_datasets(fake, seed=5)
    assert len(split.train) == 7 and len(split.val) == 3
    assert split.val.indices == build_datasets(fake, seed=5).val.indices != build_datasets(fake, seed=6).val.indices


def test_torchvision_errors(tmp_path):
    base = {"kind": "torchvision", "root": str(tmp_path), "download": False, "batch_size": 2}
    with pytest.raises(UserError, match="unknown torchvision dataset 'CIFAR11'.*Valid names: .*CIFAR10"):
        build_datasets({**base, "name": "CIFAR11"})
    with pytest.raises(UserError, match=f"cannot open torchvision dataset MNIST split 'train' at {tmp_path}.*"
                                        "data.download=false"):
        build_datasets({**base, "name": "MNIST"})
    with pytest.raises(UserError, match="FakeData has no split argument: set data.val_split=null"):
        build_datasets({**base, "name": "FakeData", "kwargs": {"size": 4}})
    write_mnist_raw(tmp_path, "MNIST", n_train=8, n_test=4)
    with pytest.raises(UserError, match="a split must be one of train, test"):
        build_datasets({**base, "name": "MNIST", "val_split": "dev"})
    with pytest.raises(UserError, match="cannot transform a sample of MNIST.*data.channels"):
        build_datasets({**base, "name": "MNIST", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})
    with pytest.raises(UserError, match="data.mean has 3 values but data.channels=1"):
        build_datasets({**base, "name": "MNIST", "channels": 1, "mean": [0.5, 0.5, 0.5]})


def test_image_folder(tmp_path):
    write_image_folder(tmp_path / "train", per_class=4)
    write_image_folder(tmp_path / "val", per_class=1)
    cfg = {"kind": "image_folder", "path": str(tmp_path / "train"), "image_size": 16, "batch_size": 4,
           "val_fraction": 0.25}
    data = build_datasets(cfg, seed=0)
    assert data.info["class_names"] == ["cat", "dog", "fox"] and len(data.train) == 9 and len(data.val) == 3
    assert build_datasets(cfg, seed=0).val.indices == data.val.indices
    images, labels = _first_batch(data, 4)
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.long
    with_val = build_datasets({**cfg, "val_path": str(tmp_path / "val")})
    assert len(with_val.train) == 12 and len(with_val.val) == 3


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images found in .*empty \(data.path; expected .*/<class>/<image>\)"):
        build_datasets({"kind": "image_folder", "path": str(tmp_path / "empty"), "batch_size": 1})
    with pytest.raises(UserError, match=r"^data path not found: /no/images \(data.path\)"):
        build_datasets({"kind": "image_folder", "path": "/no/images", "batch_size": 1})
    write_image_folder(tmp_path / "a", classes=("cat", "dog"), per_class=2)
    write_image_folder(tmp_path / "b", classes=("cat", "eel"), per_class=1)
    with pytest.raises(UserError, match="data.val_path classes .* differ from data.path classes"):
        build_datasets({"kind": "image_folder", "path": str(tmp_path / "a"), "val_path": str(tmp_path / "b"),
                        "batch_size": 1})


# -- tensors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tensors(tmp_path, suffix):
    from safetensors.torch import save_file

    x, y = torch.randn(20, 3, 4), torch.arange(20) % 5
    path = tmp_path / f"data{suffix}"
    (torch.save if suffix == ".pt" else save_file)({"inputs": x, "y": y}, str(path))
    cfg = {"kind": "tensors", "path": str(path), "x_key": "inputs", "val_fraction": 0.2, "batch_size": 4}
    data = build_datasets(cfg, seed=2)
    assert len(data.train) == 16 and len(data.val) == 4
    assert data.info["num_labels"] == 5 and data.info["x_shape"] == [3, 4]
    xb, yb = _first_batch(data, 4)
    assert xb.shape == (4, 3, 4) and yb.shape == (4,)
    val_x = torch.stack([data.val[i][0] for i in range(4)])
    rows = [int(torch.nonzero((x == v).all(-1).all(-1))[0]) for v in val_x]
    assert [int(y[r]) for r in rows] == [int(data.val[i][1]) for i in range(4)]
    assert rows == sorted(rows) and torch.equal(build_datasets(cfg, seed=2).val.tensors[0], val_x)


def test_tensors_errors(tmp_path):
    torch.save({"x": torch.zeros(4, 2), "y": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="'x' has 4 samples but 'y' has 3"):
        build_datasets({"kind": "tensors", "path": str(tmp_path / "bad.pt"), "batch_size": 1})
    with pytest.raises(UserError, match=r"has no tensor 'features' \(data.x_key\); it has: x, y"):
        build_datasets({"kind": "tensors", "path": str(tmp_path / "bad.pt"), "x_key": "features", "batch_size": 1})
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="must hold a dict of tensors, got list"):
        build_datasets({"kind": "tensors", "path": str(tmp_path / "list.pt"), "batch_size": 1})
    with pytest.raises(UserError, match=r"^data path not found: /no/t.pt \(data.path\)"):
        build_datasets({"kind": "tensors", "path": "/no/t.pt", "batch_size": 1})
