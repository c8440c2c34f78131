"""The ``few_shot`` data kind: K training images per class for CLIP few-shot learning (CoOp / CLIP-LoRA).

A dataset's images form a *pool* (labels known without decoding any image). The K shots are drawn per
class from the training pool with ``random.Random(seed)``, so the same seed gives the same set; the test
pool is evaluated in full (or a fixed subset of ``max_test``). Pools come from torchvision datasets
(downloaded where the network allows), ``root/<split>/<class>/<image>`` folders (ImageNet, UCF101 mid
frames, any ImageFolder tree), idx files (Fashion-MNIST: Debian's ``dataset-fashion-mnist`` where installed, else
torchvision's download), or CoOp's fixed split files (``split_zhou_<Dataset>.json``, the splits CLIP-LoRA's
numbers are measured on).

Preprocessing is CLIP-LoRA's: training images get ``RandomResizedCrop(scale=(0.08, 1), bicubic)`` and a
horizontal flip, test images CLIP's resize (shortest side, bicubic) and centre crop; both CLIP's
normalisation.
"""
from __future__ import annotations

import gzip
import inspect
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.clip.class_names import (FASHION_MNIST, coop_class_names, imagenet_class_names,
                                                    template_for)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts its idx files
_SPLIT_SEED = 0  # fixed: held-out test sets and max_test subsets are the same for every run seed


@dataclass(frozen=True)
class CatalogueEntry:
    """Where a benchmark dataset comes from. ``train``: splits pooled for the draw (empty: the dataset has no
    split argument); ``test`` None: ``test_fraction`` of every class is held out instead."""

    source: str
    torchvision_name: str | None
    train: tuple[str, ...]
    test: str | None
    folder: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    "imagenet": CatalogueEntry("image_folder", None, ("train",), "val", "imagenet"),
    "caltech101": CatalogueEntry("torchvision", "Caltech101", (), None),
    "oxford_pets": CatalogueEntry("torchvision", "OxfordIIITPet", ("trainval",), "test"),
    "stanford_cars": CatalogueEntry("torchvision", "StanfordCars", ("train",), "test"),
    "flowers102": CatalogueEntry("torchvision", "Flowers102", ("train", "val"), "test"),
    "food101": CatalogueEntry("torchvision", "Food101", ("train",), "test"),
    "fgvc_aircraft": CatalogueEntry("torchvision", "FGVCAircraft", ("train",), "test"),
    "sun397": CatalogueEntry("torchvision", "SUN397", (), None),
    "dtd": CatalogueEntry("torchvision", "DTD", ("train", "val"), "test"),
    "eurosat": CatalogueEntry("torchvision", "EuroSAT", (), None),
    "ucf101": CatalogueEntry("image_folder", None, ("train",), "test", "ucf101"),
    "fashion_mnist": CatalogueEntry("idx", None, ("train",), "t10k"),
}


# -- pools ---------------------------------------------------------------------------------------
class _TorchvisionImage:
    """Image ``i`` of a torchvision dataset built without transforms (picklable for DataLoader workers)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, i: int):
        return self.dataset[i][0]


class _FileImage:
    def __init__(self, paths: list[str]):
        self.paths = paths

    def __call__(self, i: int):
        from PIL import Image

        with open(self.paths[i], "rb") as f:
            return Image.open(f).convert("RGB")


class _ArrayImage:
    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])


class Pool:
    """Labelled images by index: ``refs[j] = (loader, item)``, ``labels[j]``; nothing decoded up front."""

    def __init__(self, loaders: list[Callable], refs: list[tuple[int, int]], labels: list[int]):
        self.loaders, self.refs, self.labels = loaders, refs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, j: int):
        loader, item = self.refs[j]
        return self.loaders[loader](item).convert("RGB")

    def select(self, indices: Sequence[int]) -> "Pool":
        return Pool(self.loaders, [self.refs[j] for j in indices], [self.labels[j] for j in indices])

    @staticmethod
    def concat(pools: list["Pool"]) -> "Pool":
        loaders, refs, labels = [], [], []
        for pool in pools:
            refs += [(loader + len(loaders), item) for loader, item in pool.refs]
            loaders += pool.loaders
            labels += pool.labels
        return Pool(loaders, refs, labels)


class FewShotImages(Dataset):
    """``(image tensor, label)`` items of a pool, transformed on access."""

    def __init__(self, pool: Pool, transform: Callable):
        self.pool, self.transform = pool, transform

    @property
    def labels(self) -> list[int]:
        return self.pool.labels

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, j: int):
        return self.transform(self.pool.image(j)), self.pool.labels[j]


# -- sampling ------------------------------------------------------------------------------------
def sample_shots(labels: Sequence[int], class_names: Sequence[str], shots: int, seed: int, what: str) -> list[int]:
    """Exactly ``shots`` indices per class, drawn with ``random.Random(seed)`` class by class in label
    order (sorted within a class). A class with fewer images is a ``UserError`` naming it and the counts."""
    by_class: list[list[int]] = [[] for _ in class_names]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    short = [(class_names[c], len(items)) for c, items in enumerate(by_class) if len(items) < shots]
    if short:
        name, count = short[0]
        more = f" ({len(short) - 1} more classes have too few as well)" if len(short) > 1 else ""
        raise UserError(f"{what}: class '{name}' has {count} training images, fewer than data.shots={shots}{more}; "
                        "lower data.shots or pool more splits (data.train_split=a+b)")
    rng = random.Random(seed)
    return [i for items in by_class for i in sorted(rng.sample(items, shots))]


def hold_out(labels: Sequence[int], num_classes: int, fraction: float) -> tuple[list[int], list[int]]:
    """``(train, test)`` indices with ``round(fraction * n)`` (at least 1) images of every class in test,
    chosen with a fixed seed so every run seed sees the same test set."""
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(_SPLIT_SEED)
    train, test = [], []
    for items in by_class:
        items = list(items)
        rng.shuffle(items)
        n_test = min(len(items) - 1, max(1, round(fraction * len(items)))) if len(items) > 1 else 0
        test += items[:n_test]
        train += items[n_test:]
    return sorted(train), sorted(test)


# -- transforms ----------------------------------------------------------------------------------
def augment_transform(size: int):
    """CLIP-LoRA's training augmentation."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def eval_transform(size: int):
    """CLIP's preprocess: shortest side to ``size`` (bicubic), centre crop, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


# -- sources -------------------------------------------------------------------------------------
def _splits(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for s in value.split("+") if s) if value is not None else default


def _torchvision_targets(dataset) -> list[int]:
    for attr in ("targets", "_labels", "y"):
        if isinstance(getattr(dataset, attr, None), list):
            return [int(t) for t in getattr(dataset, attr)]
    if isinstance(getattr(dataset, "_samples", None), list):
        return [int(s[1]) for s in dataset._samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # decodes every image: datasets without a label list


def _torchvision_pool(name: str, root: Path, split: str | None, download: bool) -> tuple[Pool, list[str]]:
    from torchvision import datasets

    cls = getattr(datasets, name, None) if name in datasets.__all__ else None
    if not isinstance(cls, type):
        raise UserError(f"unknown torchvision dataset '{name}'")
    params = inspect.signature(cls.__init__).parameters
    kwargs = {"root": str(root)}
    if "download" in params:
        kwargs["download"] = download
    if split is not None:
        if "split" in params:
            kwargs["split"] = split
        elif "train" in params and split in ("train", "test"):
            kwargs["train"] = split == "train"
        else:
            raise UserError(f"torchvision {name} has no split '{split}' (data.train_split / data.test_split)")
    try:
        dataset = cls(**kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        hint = "" if download else " (data.download=false: put the files there or set it true)"
        raise UserError(f"cannot open torchvision {name} split '{split or 'all'}' under {root}: "
                        f"{str(e).strip().splitlines()[0]}{hint}") from e
    raw = list(getattr(dataset, "categories", None) or getattr(dataset, "classes", None) or [])
    labels = _torchvision_targets(dataset)
    if not raw:
        raw = [str(i) for i in range(max(labels) + 1)]
    return Pool([_TorchvisionImage(dataset)], [(0, i) for i in range(len(labels))], labels), raw


def _folder_pool(directory: Path, classes: list[str] | None) -> tuple[Pool, list[str]]:
    """``directory/<class>/<image>`` with classes sorted (or those given, in that order) and files sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not directory.is_dir():
        raise UserError(f"data directory not found: {directory} (expected {directory}/<class>/<image>)")
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if classes is None:
        classes = found
    elif sorted(classes) != found:
        extra = sorted(set(found) - set(classes)) or sorted(set(classes) - set(found))
        raise UserError(f"the class folders of {directory} differ from the training split's (e.g. '{extra[0]}')")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.path for e in os.scandir(directory / name)
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"no images found in {directory} (expected {directory}/<class>/<image>)")
    return Pool([_FileImage(paths)], [(0, i) for i in range(len(paths))], labels), classes


def _idx_file(directory: Path, split: str, kind: str) -> Path | None:
    """``<split>-<kind>-idx{3,1}-ubyte`` in ``directory``, gzipped or not; None if absent."""
    stem = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    return next((directory / n for n in (stem + ".gz", stem) if (directory / n).is_file()), None)


def _idx_array(directory: Path, split: str, kind: str) -> np.ndarray:
    path = _idx_file(directory, split, kind)
    if path is None:
        raise UserError(f"idx file {split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte(.gz) not found in "
                        f"{directory} (data.path)")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_dir(root: Path, download: bool) -> Path:
    """The folder of Fashion-MNIST's idx files: Debian's ``dataset-fashion-mnist`` where installed, else
    torchvision's copy under ``root`` (downloaded there where the network allows). Neither: one ``UserError``
    naming both ways."""
    torchvision_dir = root / "FashionMNIST" / "raw"
    for directory in (Path(FASHION_MNIST_DIR), torchvision_dir):
        if all(_idx_file(directory, s, k) for s in ("train", "t10k") for k in ("images", "labels")):
            return directory
    reason = "data.download=false"
    if download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), download=True)
            return torchvision_dir
        except (RuntimeError, OSError) as e:
            reason = f"the download failed: {' '.join(str(e).split())}"
    raise UserError(f"Fashion-MNIST not found ({reason}). Either install Debian's package, offline: "
                    f"`apt-get install -y dataset-fashion-mnist` (idx files in {FASHION_MNIST_DIR}), or let "
                    f"torchvision download it where the network allows: data.download=true (into {torchvision_dir})")


def _idx_pool(directory: Path, split: str) -> Pool:
    images, labels = _idx_array(directory, split, "images"), _idx_array(directory, split, "labels")
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{directory}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
    return Pool([_ArrayImage(images)], [(0, i) for i in range(len(labels))], [int(y) for y in labels])


def _coop_split_pools(split_file: str, image_dir: Path) -> tuple[dict[str, Pool], list[str]]:
    """The pools of CoOp's ``split_zhou_*.json`` (``{split: [[path relative to image_dir, label, class name]]}``)
    and its class names in label order."""
    path = Path(split_file).expanduser()
    if not path.is_file():
        raise UserError(f"split file not found: {split_file} (data.split_file)")
    try:
        splits = json.loads(path.read_text())
        items = {split: [(str(rel), int(label), str(name)) for rel, label, name in rows]
                 for split, rows in splits.items()}
    except (ValueError, TypeError) as e:
        raise UserError(f"{split_file} is not a CoOp split file ({{split: [[image path, label, class name], ...]}}): "
                        f"{e}") from e
    names = {label: name for rows in items.values() for _, label, name in rows}
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{split_file}: labels must be 0..C-1, got {sorted(names)[:5]}...")
    first = next((rel for rows in items.values() for rel, _, _ in rows), None)
    if first is not None and not (image_dir / first).is_file():
        raise UserError(f"image {image_dir / first} of {split_file} not found: data.path must be the directory "
                        "that the split file's image paths are relative to")
    pools = {split: Pool([_FileImage([str(image_dir / rel) for rel, _, _ in rows])], [(0, i) for i in range(len(rows))],
                         [label for _, label, _ in rows]) for split, rows in items.items()}
    return pools, [names[label] for label in range(len(names))]


def _names_from_file(path: str, raw: list[str]) -> list[str]:
    """Lines "name" (in label order) or "raw_name class name" (matched to the raw names, e.g. wnids)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"class names file not found: {path} (data.class_names_file)")
    lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    keyed = dict(line.split(maxsplit=1) for line in lines if len(line.split(maxsplit=1)) == 2)
    if all(r in keyed for r in raw):
        return [keyed[r] for r in raw]
    if len(lines) != len(raw):
        raise UserError(f"{path} has {len(lines)} names for {len(raw)} classes (data.class_names_file)")
    return lines


def _class_names(cfg, raw: list[str]) -> list[str | None]:
    if cfg.class_names is not None:
        if len(cfg.class_names) != len(raw):
            raise UserError(f"data.class_names has {len(cfg.class_names)} names for {len(raw)} classes")
        return [str(n) for n in cfg.class_names]
    if cfg.class_names_file is not None:
        return _names_from_file(cfg.class_names_file, raw)
    if cfg.split_file is not None:
        return raw  # CoOp's own spelling
    if cfg.dataset == "fashion_mnist" and len(raw) == len(FASHION_MNIST):
        return list(FASHION_MNIST)
    if cfg.dataset == "imagenet" and len(raw) == 1000:
        return imagenet_class_names(cfg.imagenet_names)
    return coop_class_names(cfg.dataset, raw)


def _relabel(pool: Pool, names: list[str | None]) -> tuple[Pool, list[str]]:
    """Drop the classes named ``None`` and renumber the rest."""
    new_id = {}
    for old, name in enumerate(names):
        if name is not None:
            new_id[old] = len(new_id)
    keep = [j for j, y in enumerate(pool.labels) if y in new_id]
    kept = pool.select(keep)
    kept.labels = [new_id[y] for y in kept.labels]
    return kept, [n for n in names if n is not None]


def load_pools(cfg) -> tuple[Pool, Pool, list[str]]:
    """``(train pool, test pool, class names)`` of a validated ``few_shot`` config node."""
    entry = CATALOGUE.get(cfg.dataset)
    source = cfg.source or (entry.source if entry else "image_folder")
    if entry is not None and source != entry.source:
        entry = CatalogueEntry(source, None, ("train",), "test", cfg.dataset)
    if entry is None:
        entry = CatalogueEntry(source, cfg.dataset if source == "torchvision" else None, ("train",), "test",
                               cfg.dataset)
    if cfg.split_file is not None:
        entry = CatalogueEntry("split_file", None, ("train",), "test", entry.folder)
    train_splits = _splits(cfg.train_split, entry.train)
    test_split = cfg.test_split if cfg.test_split is not None else entry.test
    root = Path(cfg.root).expanduser()
    if cfg.split_file is not None:
        directory = Path(cfg.path).expanduser() if cfg.path else root / (entry.folder or cfg.dataset)
        pools, raw = _coop_split_pools(cfg.split_file, directory)
        unknown = [s for s in (*train_splits, test_split) if s not in pools]
        if unknown:
            raise UserError(f"{cfg.split_file} has no split '{unknown[0]}' (it has: {', '.join(pools)})")
        train = Pool.concat([pools[s] for s in train_splits])
        test = pools[test_split]
    elif source == "torchvision":
        directory = Path(cfg.path).expanduser() if cfg.path else root
        name = entry.torchvision_name or cfg.dataset
        parts = [_torchvision_pool(name, directory, s, cfg.download) for s in train_splits or (None,)]
        raw = parts[0][1]
        train = Pool.concat([p for p, _ in parts])
        test = _torchvision_pool(name, directory, test_split, cfg.download)[0] if test_split else None
    elif source == "image_folder":
        directory = Path(cfg.path).expanduser() if cfg.path else root / (entry.folder or cfg.dataset)
        parts, raw = [], None
        for s in train_splits:
            pool, raw = _folder_pool(directory / s, raw)
            parts.append(pool)
        train = Pool.concat(parts)
        test = _folder_pool(directory / test_split, raw)[0] if test_split else None
    else:
        if cfg.path:
            directory = Path(cfg.path).expanduser()
        else:
            directory = fashion_mnist_dir(root, cfg.download) if cfg.dataset == "fashion_mnist" else root / cfg.dataset
        train = Pool.concat([_idx_pool(directory, s) for s in train_splits])
        test = _idx_pool(directory, test_split) if test_split else None
        raw = [str(i) for i in range(max(train.labels) + 1)]
    if test is None:
        tr, te = hold_out(train.labels, len(raw), cfg.test_fraction)
        train, test = train.select(tr), train.select(te)
    names = _class_names(cfg, raw)
    train, class_names = _relabel(train, names)
    test, _ = _relabel(test, names)
    return train, test, class_names


def build_few_shot_data(cfg, tokenizer, seed: int):
    """The ``few_shot`` data kind: K shots per class for training, the test split as val (``tokenizer`` unused)."""
    from blocktrain.trainer.sources.data import Datasets

    train_pool, test_pool, class_names = load_pools(cfg)
    sampling_seed = seed if cfg.sampling_seed is None else cfg.sampling_seed
    shots = sample_shots(train_pool.labels, class_names, cfg.shots, sampling_seed, f"data.dataset={cfg.dataset}")
    train_pool = train_pool.select(shots)
    if cfg.max_test is not None and len(test_pool) > cfg.max_test:
        keep = sorted(random.Random(_SPLIT_SEED).sample(range(len(test_pool)), cfg.max_test))
        test_pool = test_pool.select(keep)
    templates = list(cfg.templates) if cfg.templates is not None else [template_for(cfg.dataset)]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"data.templates: '{bad[0]}' has no {{}} for the class name")
    train = FewShotImages(train_pool, augment_transform(cfg.image_size))
    test = FewShotImages(test_pool, eval_transform(cfg.image_size))
    info = {"dataset": cfg.dataset, "shots": cfg.shots, "class_names": class_names, "num_labels": len(class_names),
            "templates": templates, "train_steps": cfg.steps_per_shot * cfg.shots, "image_size": cfg.image_size,
            "sampling_seed": sampling_seed, "num_test": len(test),
            "batch_size": min(cfg.batch_size, len(train))}  # CLIP-LoRA: a pool smaller than a batch is one batch
    return Datasets(train=train, val=test, collate_fn=None, info=info,
                    calibration=FewShotImages(train_pool, eval_transform(cfg.image_size)))  # un-augmented shots
