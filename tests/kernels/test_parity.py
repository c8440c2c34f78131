"""Every Triton kernel against its reference (see parity.py); the runs happen in one subprocess."""

from __future__ import annotations

import pytest

from . import parity

CASES, CHECKS = parity.load()


@pytest.mark.parametrize("name", [c.name for c in CHECKS] + [c.name for c in CASES])
def test_triton_matches_reference(name, parity_results):
    assert name in parity_results, f"{name} did not report (the subprocess stopped early)"
    result = parity_results[name]
    assert result["ok"], result["detail"]
