"""The loop that drives the trust-region Newton iteration (:class:`~fedglmm.likelihood.newton.TrustRegionNewton`)
one round at a time, for :func:`~fedglmm.likelihood.fit.fit_glmm` and :func:`~fedglmm.likelihood.fit.fit_lmm`:
a fallback start where no start is finite, and the end of an iteration whose estimates run off."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import ConvergenceError
from .newton import TrustRegionNewton
from .runaway import runaway

# estimates that run off (likelihood.runaway) at this many accepted points in a row, from this round on, end
# the iteration, not converged: under separation Newton walks out along the flattening direction until its
# gain per step falls below the tolerance or the rounds run out (60), each round a steward's look for nothing
RUNAWAY_FROM, RUNAWAY_ROUNDS = 8, 3
# a round that finds F finite at none of its points, the nearest within this (relative) of the current point, where
# it was finite, twice in a row, ends the iteration, not converged: F cannot be evaluated there any more (the modes'
# start of a Gamma inverse-link fit outside the domain: every point after the 14th round not finite, then 46 rounds
# of steps shrinking to nothing until the 60th; tests/test_gamma_domain.py)
BLIND_STEP, BLIND_ROUNDS = 1e-8, 2


def run(opt: TrustRegionNewton, evaluate, canon, fallback=None, runs_off=None):
    """Drive the optimiser; ``evaluate(points, final)`` does one round and returns ([(f, g, H)], reply).

    Each point is first put in canonical form (non-negative diagonal of Λ): the same model, so the
    iterates stay on one side of the sign symmetry of θ.  ``final`` marks the round that may be the last
    (the parts then also return their conditional modes).  ``fallback``: points the iteration starts from
    again, in one round, where the objective was not finite at any of its starts.  ``runs_off(opt)``:
    whether the current point's estimates run off (:func:`running_off`); seen RUNAWAY_ROUNDS times in a
    row, the iteration ends there, not converged (the caller names what runs off).  Returns (solution,
    last reply, the optimiser).
    """
    xs, final, last_final, seen, blind = list(opt.starts), opt.final_candidate, False, 0, 0
    while xs:
        xs = [canon(x) for x in xs]
        results, reply = evaluate(xs, final)
        last_final = final
        blind = blind + 1 if _blind(opt, xs, results) else 0
        if blind >= BLIND_ROUNDS:
            opt.message = (f"the objective is not finite at any point of {BLIND_ROUNDS} rounds in a row, the nearest "
                           f"within {BLIND_STEP:g} of the last point, where it was finite")
            break
        xs = opt.tell(xs, results)
        final = opt.final_candidate
        if not xs and opt.current is None and fallback is not None:
            opt = replace(opt, x0=np.asarray(fallback[0], float), starts=list(fallback[1:]), evals=opt.evals,
                          message="", history=[], trace=[], sound_start=False)
            xs, final, fallback = list(opt.starts), opt.final_candidate, None
        elif xs and runs_off is not None and opt.evals >= RUNAWAY_FROM and opt.accepted is not None:
            seen = seen + 1 if runs_off(opt) else 0
            if seen >= RUNAWAY_ROUNDS:
                opt.point = opt.solution = opt.current.x
                opt.message, xs = "the estimates run off", []
                return _at(opt, evaluate, last_final)
    if not opt.converged:
        raise ConvergenceError(f"the fit did not converge: {opt.message}")
    return _at(opt, evaluate, last_final, reply)


def _blind(opt, xs: list, results: list) -> bool:
    """Whether a round found F finite at none of its points ``xs`` (``results``: their (f, g, H)), the nearest of
    them within BLIND_STEP of the current point, relative to its largest entry (and so F not finite arbitrarily
    close to a point where it was)."""
    cur = opt.current
    if cur is None or not xs or any(np.isfinite(r[0]) for r in results):
        return False
    near = min(float(np.max(np.abs(np.asarray(x, float) - cur.x))) for x in xs)
    return near <= BLIND_STEP * (1.0 + float(np.max(np.abs(cur.x))))


def _at(opt, evaluate, last_final: bool, reply=None):
    if not last_final or opt.accepted is None or reply is None:
        # ended at a point the last round did not end on (converged where no step could gain more, or
        # stopped): one final round there, for the sums at the point and the conditional modes
        _, reply = evaluate([opt.point], True)
    return opt.solution, reply, opt


def running_off(p: int, diagonal, names):
    """``runs_off`` for :func:`run`: the check of :func:`~fedglmm.likelihood.runaway.runaway` at the current
    point, from the last move and the Hessians at both ends (``p`` fixed effects; ``diagonal``: the SDs'
    positions in θ̃; ``names``: the fixed effects', for the intercept's position)."""
    intercept = list(names).index("Intercept") if "Intercept" in list(names or []) else None

    def runs_off(opt) -> bool:
        prev, cur = opt.previous, opt.current
        if prev is None or cur is None or prev.x.shape != cur.x.shape:
            return False
        path = (prev.x, prev.H, cur.x, cur.H, cur.g)
        return len(runaway(path, cur.x, cur.H, p, diagonal, intercept)) > 0

    return runs_off
