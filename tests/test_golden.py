"""Every reference case by every method equals the golden file (see tests/golden.py): refactors change
no result.  Values agree to 1e-9 relative to max(1, |value|); rounds, messages and errors exactly, except
numbers at rounding level in messages (below 1e-12); bytes to 16 per round or 10 %; the fits of :data:`EDGE`
more loosely (below).

Why these tolerances: the file was written on one machine and is checked on others, whose numpy, BLAS and
compilation of the fused kernel round differently in the last bits.  On 2 December, with numpy 2.4.6 and
numba 0.68.1 from a fresh install, ten of the 215 fits moved: an SE by 1.7e-10 relative, a one-shot fit's
reported moment error from 3.0e-15 to 3.5e-15, and, where rounding decided between two candidates of a
round, penicillin_crossed_ml over 3 sites sent 7 % fewer bytes in the same rounds.

The crossed penicillin fits sit on such an edge in their last round (:data:`EDGE`), so they are held to looser
bounds (rounds to one, bytes to half, values to 1e-8 relative): on 3 December, on an AMD EPYC machine (the file was
written on another), the final candidate of penicillin_crossed over 3 sites had a Newton decrement of 8.4e-8
against the tolerance of 1e-7, and the fit ended a round earlier than recorded (8 rounds, not 9), its SE 9.1e-9
relative from the recorded one (its logLik 1.3e-13); penicillin_crossed_ml over 3 sites moved an SE by 2.9e-9 in
the same rounds, and the one-site fits of both sent 14-16 % more or fewer bytes in the same rounds (a round's
candidates decided by rounding).

The standard errors of grouseticks' nested fits (:data:`SE_LOOSE`) are held to 1e-8: with several grouping factors
the sites' Hessians are differences of gradients, and on 7 December, on a new machine of the same kind (numpy 2.4.6,
an AMD EPYC), the iterative fit's first SE (15.8) came 1.5e-9 relative from the recorded one (over 3 sites 6e-10),
everything else within 3e-11."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from golden import GOLDEN, run, runs

RECORDED = json.loads(GOLDEN.read_text())
RUNS = list(runs())


# fits whose last round is decided at rounding level (see above)
EDGE = ("penicillin_crossed/", "penicillin_crossed_ml/")
# fits whose standard errors are held to 1e-8 (see above)
SE_LOOSE = ("grouseticks_nested/",)


def _close(a, b, tol: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tol * max(1.0, abs(b))


def _rounding(messages):
    """Messages with numbers below 1e-12 (an error at rounding level) replaced by one token."""
    if messages is None:
        return None
    return [re.sub(r"\d(\.\d+)?e-(1[2-9]|[2-9]\d|\d{3})(?!\d)", "<rounding>", m) for m in messages]


@pytest.mark.parametrize("key,case,method,split,opts", RUNS, ids=[r[0] for r in RUNS])
def test_golden(key, case, method, split, opts):
    want = RECORDED[key]
    got = run(case, method, split, opts)
    if "error" in want or "error" in got:
        assert got.get("error") == want.get("error")
        return
    edge = key.startswith(EDGE)
    tol = 1e-8 if edge else 1e-9
    r_got, r_want = got.get("rounds"), want.get("rounds")
    assert r_got == r_want or edge and None not in (r_got, r_want) and abs(r_got - r_want) <= 1, \
        ("rounds", r_got, r_want)
    for field in ("converged", "method", "names", "levels"):
        assert got.get(field) == want.get(field), field
    assert _rounding(got.get("messages")) == _rounding(want.get("messages")), (got.get("messages"), want.get("messages"))
    for field in ("bytes_to_sites", "bytes_from_sites"):
        allowed = max(16 * max(1, want["rounds"]), (0.5 if edge else 0.1) * want[field])
        assert abs(got[field] - want[field]) <= allowed, (field, got[field], want[field])
    for field in ("loglik", "residual_sd"):
        assert _close(got[field], want[field], tol), (field, got[field], want[field])
    for field in ("fixef", "se", "theta", "random", "modes", "condsd"):
        a, b = got.get(field, []), want.get(field, [])
        assert len(a) == len(b), field
        loose = 1e-8 if field == "se" and key.startswith(SE_LOOSE) else tol
        bad = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if not _close(x, y, loose)]
        assert not bad, (field, bad[:3])


def test_every_recorded_fit_is_still_run():
    assert sorted(RECORDED) == sorted(r[0] for r in RUNS)
