"""Config blocks shared by compression plugins; torch-free, so plugin configs validate before anything loads."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from blocktrain.trainer.errors import UserError

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass
class CalibrationConfig:
    """N samples of the data source's train split (text windows of data.seq_len tokens, or images), drawn by seed."""

    samples: int = 128
    batch_size: int = 8
    seed: Optional[int] = None  # null = the run's seed

    def check(self, where: str) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise UserError(f"{where}.samples and {where}.batch_size must be >= 1, got {self.samples}, {self.batch_size}")


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks run by the evaluate stage (needs `pip install lm-eval`); [] = none."""

    tasks: List[str] = field(default_factory=list)  # e.g. [boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa]
    num_fewshot: int = 0
    batch_size: int = 8
    limit: Optional[float] = None  # per task: a count (>= 1) or a fraction (< 1) of its examples; null = all
    include_path: Optional[str] = None  # a folder of your own task YAMLs (e.g. local datasets, offline)


def check_density(density: float, where: str) -> None:
    if not 0.0 < density < 1.0:
        raise UserError(f"{where}.density must be in (0, 1) (the fraction of weights kept), got {density}")


def check_pattern(pattern: str, density: float, allowed: tuple[str, ...], where: str) -> None:
    """``pattern`` is one of ``allowed`` ("layer", "row") or "N:M"; an N:M pattern keeps exactly N/M, so the
    density must say the same."""
    match = _NM.match(str(pattern))
    if match is None:
        if pattern not in allowed:
            raise UserError(f"{where}.pattern must be {', '.join(allowed)} or N:M (e.g. 2:4), got {pattern!r}")
        return
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UserError(f"{where}.pattern N:M needs 0 < N < M, got {pattern!r}")
    if abs(density - n / m) > 1e-9:
        raise UserError(f"{where}.pattern {pattern} keeps {n}/{m} of the weights but {where}.density={density}; "
                        f"set {where}.density={n / m:g}")
