"""Media a run produces (images, texts, tables): written under ``<run_dir>/media/`` and logged to W&B.

``RunContext.log_media(key, value)`` takes an image (a ``(C,H,W)``/``(H,W)`` tensor in [0, 1] or uint8,
a ``(B,C,H,W)`` batch, shown as one grid, or a PIL image), a list of strings, or a ``Table``.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import atomic_path


@dataclass
class Table:
    """Rows under named columns (e.g. prompts and samples, per-layer statistics)."""

    columns: list[str]
    rows: list[list[Any]]


def _file_stem(key: str, step: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}_step{step}"


def to_pil(value: Any):
    """A PIL image from a PIL image or an image tensor (a batch becomes a grid)."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    x = value.detach().float().cpu() if value.dtype != torch.uint8 else value.detach().cpu()
    if x.dim() == 4:  # (B, C, H, W) -> one row-major grid
        b, c, h, w = x.shape
        cols = int(np.ceil(np.sqrt(b)))
        rows = -(-b // cols)
        grid = torch.zeros((c, rows * h, cols * w), dtype=x.dtype)
        for i in range(b):
            grid[:, (i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = x[i]
        x = grid
    if x.dim() == 3:
        x = x.permute(1, 2, 0)
        x = x[..., 0] if x.shape[-1] == 1 else x
    if x.dtype != torch.uint8:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(x.numpy())


def write_media(folder: Path, key: str, value: Any, step: int) -> tuple[Path, Any]:
    """Write ``value`` under ``folder``; return the file and the W&B object that shows it."""
    import wandb

    folder.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(key, step)
    if isinstance(value, Table):
        path = folder / f"{stem}.csv"
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(value.columns)
            writer.writerows(value.rows)
        return path, wandb.Table(columns=list(value.columns), data=[list(r) for r in value.rows])
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        path = folder / f"{stem}.txt"
        with atomic_path(path) as tmp:
            tmp.write_text("\n\n".join(value) + "\n")
        return path, wandb.Table(columns=["text"], data=[[v] for v in value])
    if type(value).__name__ in ("Tensor", "Image") or hasattr(value, "save"):
        image = to_pil(value)
        path = folder / f"{stem}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        return path, wandb.Image(image)
    raise UserError(f"cannot log '{key}' as media: expected an image tensor, a PIL image, a list of strings or a "
                    f"Table, got {type(value).__name__}")
