"""Data sources behind one ``build_datasets``: text classification files, text corpora, torchvision
datasets, image folders and tensor files (the built-in data kinds; plugins register more). Every split is
deterministic given ``seed``.
"""
from __future__ import annotations

import csv
import glob
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.config import validate_data_config


@dataclass
class Datasets:
    """Train and val datasets, the collate function batches need (None = torch's default), facts about the
    data (``num_labels``, ``class_names``, ``seq_len``, sizes, ...) and the calibration view: the training
    items without random augmentation (the evaluation transform), which post-training methods calibrate on
    (None = ``train`` itself, a source that does not augment)."""

    train: Dataset
    val: Dataset | None
    collate_fn: Callable | None
    info: dict = field(default_factory=dict)
    calibration: Dataset | None = None


def build_datasets(cfg: Any, tokenizer: Any = None, seed: int = 0) -> Datasets:
    """Build the datasets a ``data`` config node describes (validated here, so a plain dict works)."""
    from blocktrain.trainer.registry import DATA_KINDS

    cfg = validate_data_config(cfg)
    data = DATA_KINDS.load(cfg.kind)(cfg, tokenizer, seed)
    if len(data.train) < data.info.get("batch_size", cfg.batch_size):  # a source may lower it (few-shot pools)
        raise UserError(f"the {cfg.kind} train split has {len(data.train)} samples, fewer than one batch "
                        f"(data.batch_size={cfg.batch_size}); lower data.batch_size or add data")
    if data.val is not None and len(data.val) == 0:
        raise UserError(f"the {cfg.kind} val split is empty")
    data.info.update(kind=cfg.kind, seed=seed, num_train=len(data.train),
                     num_val=len(data.val) if data.val is not None else 0)
    return data


# -- helpers -----------------------------------------------------------------------------------
def _existing(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data path not found: {path} (data.{key})")
    return p


def split_indices(n: int, fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """Sorted ``(train, val)`` index lists with ``round(n * fraction)`` (at least 1) val items, chosen
    by a permutation seeded with ``seed``."""
    if fraction <= 0:
        return list(range(n)), []
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise UserError(f"{what} has {n} samples: too few to hold out a val_fraction of {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _need_tokenizer(tokenizer, kind: str):
    if tokenizer is None:
        raise UserError(f"data kind '{kind}' needs the model's tokenizer, and the model has none "
                        "(check model.processor / model.tokenizer)")


# -- text classification -----------------------------------------------------------------------
class EncodedTexts(Dataset):
    """Tokenised texts with integer labels; items are ``{"input_ids": list, "labels": int}``."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class PadCollate:
    """Right-pads ``input_ids`` to the longest item of a batch: ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            ids[row, :len(it["input_ids"])] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            mask[row, :len(it["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.as_tensor([it["labels"] for it in items], dtype=torch.long)}


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def read_records(path: Path, key: str) -> list[dict]:
    """Records of a ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` (a list of objects) file, or of every such
    file in a directory."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)
        if not files:
            raise UserError(f"empty data directory: no {', '.join(TABLE_SUFFIXES)} files in {path} (data.{key})")
        return [record for f in files for record in read_records(f, key)]
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".csv", ".tsv"):
        records = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON Lines: {e}") from e
    elif suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(records, list):
            raise UserError(f"{path} must hold a JSON list of records")
    else:
        raise UserError(f"unsupported file type '{path.suffix}' for data.{key}={path}: use .csv, .tsv, .jsonl or .json")
    if not records:
        raise UserError(f"no records in {path} (data.{key})")
    if not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path} must hold one object per record")
    return records


def _column(records: list[dict], name: str, key: str, path: Path) -> list:
    missing = [i for i, r in enumerate(records) if r.get(name) is None]
    if missing:
        raise UserError(f"{path}: record {missing[0]} has no field '{name}' (data.{key}); "
                        f"fields: {', '.join(map(str, records[missing[0]]))}")
    return [r[name] for r in records]


_INT = re.compile(r"^\s*\d+\s*$")


def label_names(labels: list) -> list[str]:
    """Class names in id order: ``0..max`` for integer labels (ints or digit strings), else the sorted
    distinct strings."""
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 or isinstance(v, str) and _INT.match(v)
           for v in labels):
        return [str(i) for i in range(max(int(v) for v in labels) + 1)]
    return sorted({str(v) for v in labels})


def _label_ids(labels: list, names: list[str], path: Path) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    key = (lambda v: str(int(v))) if names == [str(i) for i in range(len(names))] else str
    ids = []
    for v in labels:
        try:
            ids.append(index[key(v)])
        except (KeyError, ValueError):
            raise UserError(f"{path}: label {v!r} is not one of the train labels ({', '.join(names[:20])})") from None
    return ids


def build_text_classification(cfg, tokenizer, seed) -> Datasets:
    _need_tokenizer(tokenizer, cfg.kind)
    train_path = _existing(cfg.train, "train")
    records = read_records(train_path, "train")
    texts = _column(records, cfg.text_field, "text_field", train_path)
    labels = _column(records, cfg.label_field, "label_field", train_path)
    names = label_names(labels)
    train_ids = _label_ids(labels, names, train_path)
    if cfg.val is not None:
        val_path = _existing(cfg.val, "val")
        val_records = read_records(val_path, "val")
        val_texts = _column(val_records, cfg.text_field, "text_field", val_path)
        val_ids = _label_ids(_column(val_records, cfg.label_field, "label_field", val_path), names, val_path)
    else:
        tr, va = split_indices(len(texts), cfg.val_fraction, seed, str(train_path))
        val_texts, val_ids = [texts[i] for i in va], [train_ids[i] for i in va]
        texts, train_ids = [texts[i] for i in tr], [train_ids[i] for i in tr]

    def encode(batch, ids):
        enc = tokenizer([str(t) for t in batch], truncation=True, max_length=cfg.max_length)["input_ids"]
        return EncodedTexts(list(enc), ids)

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise UserError("the tokenizer has no pad token, which batching texts of different lengths needs")
    return Datasets(
        train=encode(texts, train_ids),
        val=encode(val_texts, val_ids) if val_texts else None,
        collate_fn=PadCollate(pad_id),
        info={"num_labels": len(names), "class_names": names, "seq_len": cfg.max_length},
    )


# -- text corpus -------------------------------------------------------------------------------
class TokenBlocks(Dataset):
    """Fixed-length token sequences; items are ``{"input_ids": x, "labels": x}``. With ``scored_from``, window
    i's labels are -100 before position ``scored_from[i]`` (tokens an earlier window already scores)."""

    def __init__(self, blocks: torch.Tensor, scored_from: torch.Tensor | None = None):
        self.blocks = blocks
        self.scored_from = scored_from

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        x = self.blocks[i]
        if self.scored_from is None or not self.scored_from[i]:
            return {"input_ids": x, "labels": x}
        labels = x.clone()
        labels[:int(self.scored_from[i])] = -100
        return {"input_ids": x, "labels": labels}


def corpus_files(entries: list[str], pattern: str) -> list[Path]:
    """Expand ``data.files`` entries (files, directories searched with ``pattern``, glob patterns)."""
    found = []
    for entry in entries:
        p = Path(entry).expanduser()
        if any(c in entry for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"no files match {entry} (data.files)")
        elif p.is_dir():
            matches = sorted(m for m in p.glob(pattern) if m.is_file())
            if not matches:
                raise UserError(f"no files matching '{pattern}' in directory {p} (data.files, data.pattern)")
        elif p.is_file():
            matches = [p]
        else:
            raise UserError(f"data path not found: {entry} (data.files)")
        found.extend(matches)
    return found


def tokenize_corpus(files: list[Path], tokenizer, add_eos: bool, lines_per_call: int = 256) -> torch.Tensor:
    """One token stream over ``files`` in order (each file ends with the EOS token when ``add_eos``)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if add_eos and eos is None:
        raise UserError("the tokenizer has no EOS (or SEP) token to end each file with; set data.add_eos=false")
    ids: list[int] = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        chunks = ["".join(lines[i:i + lines_per_call]) for i in range(0, len(lines), lines_per_call)]
        if chunks:
            for piece in tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]:
                ids.extend(piece)
        if add_eos:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _blocks(stream: torch.Tensor, seq_len: int, stride: int, limit: int | None,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``seq_len`` every ``stride`` tokens (a seeded subset of ``limit``) and, per window, how many of
    its leading tokens the previous kept window covers (for scoring every token once)."""
    if stream.numel() < seq_len:
        return stream.new_zeros((0, seq_len)), stream.new_zeros((0,))
    starts = torch.arange(0, stream.numel() - seq_len + 1, stride)
    if limit is not None and starts.numel() > limit:
        keep = torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(seed))[:limit]
        starts = starts[keep.sort().values]
    covered = torch.zeros_like(starts)
    covered[1:] = (starts[:-1] + seq_len - starts[1:]).clamp(min=0)
    return stream.unfold(0, seq_len, stride)[starts // stride].contiguous(), covered


def build_text_corpus(cfg, tokenizer, seed) -> Datasets:
    _need_tokenizer(tokenizer, cfg.kind)
    files = corpus_files(list(cfg.files), cfg.pattern)
    stream = tokenize_corpus(files, tokenizer, cfg.add_eos)
    stride = cfg.stride or cfg.seq_len
    n_val = int(stream.numel() * cfg.val_fraction)
    train_stream, val_stream = stream[:stream.numel() - n_val], stream[stream.numel() - n_val:]
    train, _ = _blocks(train_stream, cfg.seq_len, stride, cfg.max_sequences, seed)
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    if train.shape[0] == 0:
        raise UserError(f"the corpus {where} has {train_stream.numel()} training tokens, fewer than one "
                        f"sequence of data.seq_len={cfg.seq_len}")
    val = None
    if n_val:
        val, val_covered = _blocks(val_stream, cfg.seq_len, stride, cfg.max_sequences, seed + 1)
        if val.shape[0] == 0:
            raise UserError(f"the held-out tail of {where} has {n_val} tokens, fewer than one sequence of "
                            f"data.seq_len={cfg.seq_len}; raise data.val_fraction or lower data.seq_len")
    return Datasets(
        train=TokenBlocks(train),
        val=TokenBlocks(val, scored_from=val_covered) if val is not None else None,  # each token scored once
        collate_fn=None,
        info={"seq_len": cfg.seq_len, "stride": stride, "num_files": len(files),
              "num_tokens": stream.numel(), "num_val_tokens": n_val, "vocab_size": len(tokenizer)},
    )


# -- images ------------------------------------------------------------------------------------
class ConvertMode:
    """PIL image to ``mode`` (``"RGB"`` / ``"L"``); a class so DataLoader workers can pickle it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


def image_transform(cfg, train: bool = False):
    """Channel conversion, resize to ``image_size`` squared, to tensor, normalise by ``mean``/``std``; with
    ``augment: deit``, timm's DeiT pipelines instead (``deit_transform``)."""
    from torchvision import transforms

    if cfg.channels is not None:
        for key in ("mean", "std"):
            if len(cfg[key]) not in (1, cfg.channels):
                raise UserError(f"data.{key} has {len(cfg[key])} values but data.channels={cfg.channels}")
    if cfg.augment == "deit":
        return deit_transform(cfg, train)
    if train and cfg.repeats > 1:
        raise UserError(f"data.repeats={cfg.repeats} repeats each training image with a fresh random augmentation, "
                        "and data.augment=none has none: set data.augment=deit or data.repeats=1")
    steps = []
    if cfg.channels is not None:
        steps.append(ConvertMode("RGB" if cfg.channels == 3 else "L"))
    if cfg.image_size is not None:
        steps.append(transforms.Resize((cfg.image_size, cfg.image_size)))
    steps += [transforms.ToTensor(), transforms.Normalize(list(cfg.mean), list(cfg.std))]
    return transforms.Compose(steps)


def deit_transform(cfg, train: bool):
    """The DeiT recipe's pipelines, built by timm. Training: random resized crop (bicubic), horizontal flip,
    RandAugment ``rand-m9-mstd0.5-inc1``, normalisation, random erasing (p 0.25, per-pixel noise). Evaluation (and
    calibration): resize the short side to ``image_size / 0.875`` (bicubic), centre crop ``image_size``."""
    from timm.data import create_transform
    from torchvision import transforms

    if cfg.image_size is None or cfg.channels != 3:
        raise UserError(f"data.augment=deit needs RGB images of a fixed size: set data.image_size (got "
                        f"{cfg.image_size}) and data.channels=3 (got {cfg.channels})")
    mean, std = (tuple(v) * (3 if len(v) == 1 else 1) for v in (cfg.mean, cfg.std))
    if not train:
        return transforms.Compose([ConvertMode("RGB"), create_transform(
            cfg.image_size, is_training=False, interpolation="bicubic", crop_pct=0.875, mean=mean, std=std)])
    return transforms.Compose([ConvertMode("RGB"), create_transform(
        cfg.image_size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3,
        interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1, mean=mean, std=std)])


def _hold_out(train, plain, fraction: float, seed: int, what: str):
    """Split ``fraction`` off the training data: (train, val, calibration view). The held-out part and the
    calibration view read ``plain``, the same images through the evaluation transform."""
    tr, va = split_indices(len(train), fraction, seed, what)
    return Subset(train, tr), (Subset(plain, va) if va else None), Subset(plain, tr)


def _probe(dataset, what: str):
    """Load one sample so a broken pipeline fails here, with the dataset named, not mid-training."""
    try:
        dataset[0]
    except RuntimeError as e:
        raise UserError(f"cannot transform a sample of {what}: {e} (check data.channels, data.mean, data.std)") from e


_TRAIN_FLAG = {"train": True, "test": False, "val": False, "valid": False, "validation": False}


def build_torchvision(cfg, tokenizer, seed) -> Datasets:
    from torchvision import datasets

    cls = getattr(datasets, cfg.name, None) if cfg.name in datasets.__all__ else None
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        valid = sorted(n for n in datasets.__all__ if n[0].isupper() and n not in ("VisionDataset", "DatasetFolder"))
        raise UserError(f"unknown torchvision dataset '{cfg.name}' (data.name). Valid names: {', '.join(valid)}")
    params = inspect.signature(cls.__init__).parameters
    root = Path(cfg.root).expanduser()
    base = dict(cfg.kwargs)
    if "root" in params:
        base["root"] = str(root)
    if "download" in params:
        base["download"] = cfg.download

    def make(split: str, train: bool):
        kwargs = {"transform": image_transform(cfg, train), **base}
        if "train" in params:
            if split not in _TRAIN_FLAG:
                raise UserError(f"{cfg.name} has a train/test flag: a split must be one of "
                                f"{', '.join(_TRAIN_FLAG)}, got '{split}'")
            kwargs["train"] = _TRAIN_FLAG[split]
        elif "split" in params:
            kwargs["split"] = split
        elif split != cfg.train_split:
            raise UserError(f"{cfg.name} has no split argument: set data.val_split=null to hold out "
                            "data.val_fraction of it")
        try:
            return cls(**kwargs)
        except (RuntimeError, ValueError, OSError) as e:
            hint = "" if cfg.download else " (data.download=false: put the files under data.root or set it true)"
            raise UserError(f"cannot open torchvision dataset {cfg.name} split '{split}' at {root}: {e}{hint}") from e

    train = make(cfg.train_split, True)
    plain = make(cfg.train_split, False) if cfg.augment != "none" else train  # the evaluation transform
    if cfg.val_split is not None:
        val = make(cfg.val_split, False)
    else:
        train, val, plain = _hold_out(train, plain, cfg.val_fraction, seed, f"{cfg.name} at {root}")
    _probe(train, cfg.name)
    classes = list(getattr(train.dataset if isinstance(train, Subset) else train, "classes", None) or [])
    info = {"class_names": classes, "num_labels": len(classes)} if classes else {}
    return Datasets(train=train, val=val, collate_fn=None, info={"image_size": cfg.image_size, **info},
                    calibration=plain)


def build_image_folder(cfg, tokenizer, seed) -> Datasets:
    from torchvision.datasets import ImageFolder

    def open_folder(path, key, train):
        p = _existing(path, key)
        try:
            return ImageFolder(str(p), transform=image_transform(cfg, train))
        except FileNotFoundError as e:
            raise UserError(f"no images found in {p} (data.{key}; expected {p}/<class>/<image>): {e}") from e

    train = open_folder(cfg.path, "path", True)
    plain = open_folder(cfg.path, "path", False) if cfg.augment != "none" else train  # the evaluation transform
    classes = list(train.classes)
    if cfg.val_path is not None:
        val = open_folder(cfg.val_path, "val_path", False)
        if list(val.classes) != classes:
            raise UserError(f"data.val_path classes {val.classes} differ from data.path classes {classes}")
    else:
        train, val, plain = _hold_out(train, plain, cfg.val_fraction, seed, str(cfg.path))
    _probe(train, str(cfg.path))
    return Datasets(train=train, val=val, collate_fn=None, calibration=plain,
                    info={"class_names": classes, "num_labels": len(classes), "image_size": cfg.image_size})


# -- tensors -----------------------------------------------------------------------------------
def load_tensors(path: str, key: str, x_key: str, y_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors ``x_key`` and ``y_key`` from a ``.pt``/``.pth`` (a dict saved with torch.save) or ``.safetensors`` file."""
    p = _existing(path, key)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        content = load_file(str(p))
    elif p.suffix in (".pt", ".pth"):
        try:
            content = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # a foreign or corrupt file is the user's to fix
            raise UserError(f"cannot read {p} (data.{key}): {e}") from e
        if not isinstance(content, dict):
            raise UserError(f"{p} (data.{key}) must hold a dict of tensors, got {type(content).__name__}")
    else:
        raise UserError(f"unsupported file type '{p.suffix}' for data.{key}={path}: use .pt or .safetensors")
    for name, what in ((x_key, "x_key"), (y_key, "y_key")):
        if not isinstance(content.get(name), torch.Tensor):
            raise UserError(f"{p} has no tensor '{name}' (data.{what}); it has: {', '.join(map(str, content))}")
    x, y = content[x_key], content[y_key]
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{p}: '{x_key}' has {x.shape[0]} samples but '{y_key}' has {y.shape[0]}")
    return x, y


def build_tensors(cfg, tokenizer, seed) -> Datasets:
    x, y = load_tensors(cfg.path, "path", cfg.x_key, cfg.y_key)
    if cfg.val_path is not None:
        vx, vy = load_tensors(cfg.val_path, "val_path", cfg.x_key, cfg.y_key)
        train, val = TensorDataset(x, y), TensorDataset(vx, vy)
    else:
        tr, va = split_indices(x.shape[0], cfg.val_fraction, seed, cfg.path)
        train = TensorDataset(x[tr], y[tr])
        val = TensorDataset(x[va], y[va]) if va else None
    info = {"x_shape": list(x.shape[1:]), "y_shape": list(y.shape[1:])}
    if not y.is_floating_point() and y.dim() == 1 and y.numel():
        info["num_labels"] = int(y.max()) + 1
    return Datasets(train=train, val=val, collate_fn=None, info=info)
