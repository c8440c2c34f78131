"""Checkpoints: atomic writes (temp file + rename), finding the newest one, weights-only init.

Only files a run wrote into its own run dir, and ``resume=PATH`` (which trusts its file), are fully
unpickled; ``init_from`` reads tensors only, so a downloaded file cannot run code.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder and rename it into place.

    A crash or Ctrl-C during the write leaves the previous checkpoint untouched and readable.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def checkpoint_dir(run_dir: Path, phase: str = "fit") -> Path:
    """A fit phase's checkpoint folder: ``checkpoints/`` for the phase named ``fit``, else ``checkpoints/<phase>/``."""
    return run_dir / "checkpoints" if phase == "fit" else run_dir / "checkpoints" / phase


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written ``*.ckpt`` in ``folder``, or None."""
    found = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resolve_resume(resume: str | None, run_dir: Path, phase: str = "fit") -> Path | None:
    """``resume=auto`` -> the newest checkpoint of the fit phase (None if there is none yet); a path -> that file."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_checkpoint(checkpoint_dir(run_dir, phase))
    path = Path(resume).expanduser()
    if path.is_dir():
        path = newest_checkpoint(checkpoint_dir(path) if checkpoint_dir(path).is_dir() else path) or path
    if not path.is_file():
        raise UserError(f"resume checkpoint not found: {resume}")
    return path


def load_weights(model: torch.nn.Module, path: Path, plugins: list) -> None:
    """``init_from``: weights only, from a plugin's export, a Lightning .ckpt or a safetensors file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"init_from path not found: {path}")
    for plugin in plugins:
        if plugin.load_weights(model, path):
            return
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        state = read_weights_only(path)
        state = state.get("state_dict", state) if isinstance(state, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"init_from {path} holds no state dict (a mapping of parameter names to tensors)")
        state = {k.removeprefix("model."): v for k, v in state.items()}
    else:
        raise UserError(f"init_from: cannot read {path} (expected a .ckpt, .pt, .safetensors or a plugin export dir)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(list(model.state_dict())):
        raise UserError(f"init_from {path}: the weights do not match the model "
                        f"({len(unexpected)} unexpected keys, {len(missing)} missing)")


def read_weights_only(path: Path) -> Any:
    """Unpickle ``path`` with ``weights_only=True``: tensors, plain containers and numpy arrays (the RNG state in
    our checkpoints), never code. A file that needs more is refused with a ``UserError`` naming what it holds."""
    import numpy as np

    # numpy's array reconstructor, array and dtype classes (some numpy versions pickle uint32 as its own dtype
    # class) build data only; an object array's items still go through the restricted unpickler
    torch.serialization.add_safe_globals([np.zeros(0).__reduce__()[0], np.ndarray, np.dtype,
                                          type(np.dtype(np.uint32))])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(f"init_from {path} holds more than weights: unpickling it would call "
                        f"{needs.group(1) if needs else 'code'}, and init_from loads weights only. Save the weights "
                        "alone (a .safetensors file, or torch.save(model.state_dict())); resume=PATH continues a run "
                        "from a checkpoint you trust") from None
