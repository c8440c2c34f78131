"""Quantization tests: one intra-op thread for toy models, and the overrides running an LLM recipe on the tiny
Llama and corpus of tests/conftest.py (hidden 32, MLP 64: groups of 16 divide every width)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)


def llm_args(recipe: str, llama_dir: Path, corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """``train`` overrides for a quantization (or pruning) recipe on the tiny Llama, 16-token windows."""
    return [f"recipe={recipe}", f"model.id={llama_dir}", f"data.files=[{corpus}]", "data.seq_len=16",
            "data.val_fraction=0.2", "data.batch_size=8", f"run_dir={run_dir}", "trainer=cpu", "logger=none",
            "trainer.enable_progress_bar=false", *extra]
