"""Every reference case by every method equals the golden file (see tests/golden.py): refactors change
no result.  Values agree to 1e-10 relative to max(1, |value|); rounds, messages and errors exactly; bytes to 16
per round (a float's shortest repr gains or loses a digit when its last bit moves, as it does between
compilations of the fused kernel)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from golden import GOLDEN, run, runs

RECORDED = json.loads(GOLDEN.read_text())
RUNS = list(runs())


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-10 * max(1.0, abs(b))


@pytest.mark.parametrize("key,case,method,split,opts", RUNS, ids=[r[0] for r in RUNS])
def test_golden(key, case, method, split, opts):
    want = RECORDED[key]
    got = run(case, method, split, opts)
    if "error" in want or "error" in got:
        assert got.get("error") == want.get("error")
        return
    for field in ("rounds", "converged", "method", "messages", "names", "levels"):
        assert got.get(field) == want.get(field), field
    for field in ("bytes_to_sites", "bytes_from_sites"):
        assert abs(got[field] - want[field]) <= 16 * max(1, want["rounds"]), (field, got[field], want[field])
    for field in ("loglik", "residual_sd"):
        assert _close(got[field], want[field]), (field, got[field], want[field])
    for field in ("fixef", "se", "theta", "random", "modes", "condsd"):
        a, b = got.get(field, []), want.get(field, [])
        assert len(a) == len(b), field
        bad = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if not _close(x, y)]
        assert not bad, (field, bad[:3])


def test_every_recorded_fit_is_still_run():
    assert sorted(RECORDED) == sorted(r[0] for r in RUNS)
