"""The points a round of the coordinator's Newton iteration (:mod:`fedglmm.likelihood.newton`) holds: the
current one (:class:`State`) and the steps proposed from it (:class:`Candidate`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .steps import trust_region_subproblem


@dataclass
class State:
    x: np.ndarray
    f: float
    g: np.ndarray
    H: np.ndarray


@dataclass
class Candidate:
    step: np.ndarray
    pred: float        # predicted decrease
    norm: float        # scaled step length
    radius: float      # radius it was computed for
    newton: bool = False   # the full Newton step
    settle: bool = False   # the step that settles the last one (see _stop_or_settle)
    limit: bool = False    # the step onto the poisson limit (see _tail)
    cov: bool = False      # a step in the covariance's entries or a turn off a saddle (see _in_covariance)
    land: float | None = None   # a step to third order: the decrement it is predicted to leave (_third_final) ...
    miss: np.ndarray | None = None  # ... and the difference of its two steps, the way the last step is predicted to go

    @property
    def full(self) -> bool:
        """A step taken whole: Newton's, or another model's outside the trust region's radii (log scale, Σ's
        entries, onto a boundary, to third order), which near the optimum contracts as Newton's does."""
        return self.newton or not np.isfinite(self.radius)


HEDGE = 4.0         # a round whose steps are all longer than this (scaled) also tries shorter ones (hedges)
MODEL_REACH = 2.0   # a caller's model step longer than this many Newton steps (scaled_norm) is not tried


def scaled_norm(step, H) -> float:
    """The length of ``step`` scaled by √|diag H|, the units of the trust region's radii."""
    return float(np.linalg.norm(np.sqrt(np.maximum(np.abs(np.diag(H)), 1e-12)) * step))


def unbounded(step, pred: float, H, newton: bool = False) -> Candidate:
    """A candidate outside the trust region's radii (a final, boundary or covariance step), its length
    scaled by √|diag H| as the radii are."""
    return Candidate(step, pred, scaled_norm(step, H), np.inf, newton)


def radius_scale(H) -> np.ndarray:
    """d = √|diag H| (floored), the scale of the trust region's radii."""
    return np.sqrt(np.maximum(np.abs(np.diag(H)), 1e-12 * max(1.0, np.max(np.abs(np.diag(H))))))


def radius_step(g, H, d, radius: float) -> Candidate:
    """The trust region's step for ``radius`` in the units d (:func:`radius_scale`): :func:`~fedglmm.likelihood.
    steps.trust_region_subproblem` in the scaled coordinates."""
    y = trust_region_subproblem(g / d, H / np.outer(d, d), radius)
    s = y / d
    return Candidate(s, -(g @ s + 0.5 * s @ H @ s), float(np.linalg.norm(y)), radius)


def hedges(cands: list, g, H, newton, spread: float) -> list[Candidate]:
    """Where every step of a round is longer than HEDGE (in the radii's units; from a poor start, or where
    the radius just grew), the trust region's steps at 1/spread and 1/spread² of the Newton step's length
    (``newton``, None where H is indefinite: of the shortest step), those of them at least 1 long and shorter
    than every other: a round whose steps all fail costs a round, a point more only the sites' work.  sim_slope5 with every
    group a site (benchmarks/rounds_heldout.py): from a start 184 above the optimum Newton's step was 25
    long, the model's 18, the step in Σ's entries 25; all failed, and the next round's radii 1.1 and 4.4
    gained: 7 rounds, with these 5 (no other of the 188 held-out fits changed).  The iterative method, from
    site totals: 1183 -> 1138 rounds there, 678 -> 668 on stress_methods.py's 100 fits, 322 -> 316 on
    nb_poisson_limit.py's 40.  Not in fits evaluated in place (NewtonConfig.local: a point costs what a round
    does), where they changed the pseudo-data fits' paths under complete separation so much that the run-off
    check named the wrong coefficient (tests/test_runaway.py)."""
    short = min((c.norm for c in cands), default=0.0)
    if short <= HEDGE:
        return []
    d = radius_scale(H)
    reach = float(np.linalg.norm(d * newton)) if newton is not None else short
    return [radius_step(g, H, d, r) for r in (reach / spread, reach / spread ** 2) if 1.0 <= r < short]
