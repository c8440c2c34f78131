"""The ``idx_images`` data kind: images and labels read from idx files (MNIST's format), as ``(x, y)`` with
``x`` a float ``(1, H, W)`` image in [-1, 1] (optionally padded) and ``y`` the class id."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.data import Datasets

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (plain or gzip) as an array of its declared type and shape."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _DTYPES:
        raise UserError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzip if ``path`` ends in .gz); the inverse of ``read_idx``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def _split(cfg, images: str, labels: str, limit, what: str) -> TensorDataset:
    root = Path(cfg.root).expanduser()
    paths = [root / images, root / labels]
    for p, key in zip(paths, (f"{what}_images", f"{what}_labels")):
        if not p.is_file():
            raise UserError(f"data file not found: {p} (data.root + data.{key}); Fashion-MNIST ships in Debian's "
                            "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)")
    x, y = (read_idx(p)[:limit] for p in paths)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{paths[0]} / {paths[1]}: expected (N, H, W) images and N labels, got {x.shape} and {y.shape}")
    x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1)[:, None]
    if cfg.pad_to is not None:
        extra = cfg.pad_to - x.shape[-1]
        if extra < 0 or x.shape[-1] != x.shape[-2]:
            raise UserError(f"data.pad_to={cfg.pad_to} is smaller than the images ({tuple(x.shape[-2:])}) or they are not square")
        x = F.pad(x, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2), value=-1.0)
    return TensorDataset(x, torch.from_numpy(y.astype(np.int64)))


def build_idx_images(cfg, tokenizer, seed) -> Datasets:
    train = _split(cfg, cfg.train_images, cfg.train_labels, cfg.max_train, "train")
    val = _split(cfg, cfg.val_images, cfg.val_labels, cfg.max_val, "val") if cfg.val_images is not None else None
    top = int(train.tensors[1].max()) + 1
    names = list(cfg.class_names) if top <= len(cfg.class_names) else [str(i) for i in range(top)]
    num_labels = len(names)
    shape = list(train.tensors[0].shape[1:])
    return Datasets(train=train, val=val, collate_fn=None,
                    info={"num_labels": num_labels, "class_names": names, "image_shape": shape})
