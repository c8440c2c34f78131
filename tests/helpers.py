"""Helpers shared by the engine tests: run the `train` CLI in a subprocess and read run outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    # PYTHONSAFEPATH: `python -m` run from the repository root must not put the root on sys.path, where the folder
    # kernels/ would shadow Hugging Face's `kernels` package (transformers >= 5.25 imports it); the console script
    # `train` never does. Inherited by the processes Lightning launches (DDP).
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
               PYTHONSAFEPATH="1")
    env.update(extra)
    return env


def train(*args: str, cwd: Path | None = None, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `train ARGS` as a user would (the installed console script's module), capturing output."""
    cmd = [sys.executable, "-m", "blocktrain.trainer.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the offline W&B run(s) under ``run_dir``, decoded from the .wandb files.

    The files use LevelDB's log format (32 KiB blocks of CRC/length/type-framed chunks) around
    protobuf ``Record`` messages; reading them proves what W&B received, not just that a folder exists.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunks = path.read_bytes(), 7, []
        assert data[:4] == b":W&B", f"not a W&B run file: {path}"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            chunks.append(data[pos + 7:pos + 7 + length])
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST chunk of a record
                record = pb.Record()
                record.ParseFromString(b"".join(chunks))
                chunks = []
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


def interrupt_at(step: int, phase_prefix: str = ""):
    """A Lightning callback that simulates Ctrl-C right after optimizer step ``step`` (of the fit phase whose
    metric prefix is ``phase_prefix``: "" for the phase named fit)."""
    import pytorch_lightning as pl

    class InterruptAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step and pl_module.prefix == phase_prefix:
                raise KeyboardInterrupt

    return InterruptAt()


def llm_args(recipe: str, llama_dir: Path, corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """``train`` overrides running an LLM compression recipe on the tiny Llama and corpus of tests/conftest.py
    (16-token windows)."""
    return [f"recipe={recipe}", f"model.id={llama_dir}", f"data.files=[{corpus}]", "data.seq_len=16",
            "data.val_fraction=0.2", "data.batch_size=8", f"run_dir={run_dir}", "trainer=cpu", "logger=none",
            "trainer.enable_progress_bar=false", *extra]
