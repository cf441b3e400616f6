"""The loop that drives the Newton rounds (fedglmm.likelihood.drive.run): where F stops being finite near the
last point, the rounds end at once, not converged; where it is not finite only far away, they go on."""
from __future__ import annotations

import numpy as np
import pytest

from fedglmm.errors import ConvergenceError
from fedglmm.likelihood.drive import run
from fedglmm.likelihood.newton import TrustRegionNewton
from fedglmm.model.options import NewtonConfig


def _exp_objective(x):
    """F = Σ (e^x − 2x), minimum at x = log 2, not finite beyond x = 3 (a domain's edge)."""
    if np.any(x > 3.0):
        return np.nan, np.full(len(x), np.nan), np.full((len(x), len(x)), np.nan)
    return float(np.sum(np.exp(x) - 2.0 * x)), np.exp(x) - 2.0, np.diag(np.exp(x))


def _drive(objective, x0, broken_after=None, calls=None):
    calls = [] if calls is None else calls

    def evaluate(xs, final):
        calls.append(len(xs))
        bad = broken_after is not None and len(calls) > broken_after
        out = [objective(np.asarray(x, float)) for x in xs]
        return [(np.nan, g * np.nan, H * np.nan) if bad else (f, g, H) for f, g, H in out], None

    opt = TrustRegionNewton(np.asarray(x0, float), NewtonConfig(max_evals=60))
    return run(opt, evaluate, lambda x: x), calls


def test_not_finite_far_away_only_goes_on_to_the_optimum():
    """From x = -3 Newton's first step lands at 36, where F is not finite: shorter steps reach log 2."""
    beyond = []

    def objective(x):
        out = _exp_objective(x)
        beyond.append(not np.isfinite(out[0]))
        return out

    (solution, _, opt), calls = _drive(objective, [-3.0, -3.0])
    assert opt.converged and np.allclose(solution, np.log(2.0), atol=1e-8)
    assert beyond[:2] == [False, True] and len(calls) < 20


def test_not_finite_next_to_the_last_point_ends_the_rounds():
    """Every point not finite from the 4th round on (the evaluation broke down, as where a fit's modes start
    outside its domain): the trust region shrinks the steps 16-fold a round, and the rounds end once the nearest
    point is within 1e-8 of the last one, two rounds in a row -- the 12th round here (nearest 4e-9, then 2.4e-10
    away), not the 60th (max_evals) -- and not converged."""
    def objective(x):
        return float(np.sum((x - 1.0) ** 4 + x ** 2)), 4 * (x - 1.0) ** 3 + 2 * x, np.diag(12 * (x - 1.0) ** 2 + 2.0)

    calls = []
    with pytest.raises(ConvergenceError, match="did not converge: the objective is not finite at any point of 2 "
                                               "rounds in a row, the nearest within 1e-08 of the last point"):
        _drive(objective, [-5.0, 3.0], broken_after=3, calls=calls)
    assert len(calls) == 12, len(calls)
