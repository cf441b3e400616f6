"""The points a round of the coordinator's Newton iteration (:mod:`fedglmm.likelihood.newton`) holds: the
current one (:class:`State`) and the steps proposed from it (:class:`Candidate`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    land: float | None = None   # a step to third order: the decrement it is predicted to leave (_third_final)

    @property
    def full(self) -> bool:
        """A step taken whole: Newton's, or another model's outside the trust region's radii (log scale, Σ's
        entries, onto a boundary, to third order), which near the optimum contracts as Newton's does."""
        return self.newton or not np.isfinite(self.radius)


MODEL_REACH = 2.0   # a caller's model step longer than this many Newton steps (scaled_norm) is not tried


def scaled_norm(step, H) -> float:
    """The length of ``step`` scaled by √|diag H|, the units of the trust region's radii."""
    return float(np.linalg.norm(np.sqrt(np.maximum(np.abs(np.diag(H)), 1e-12)) * step))


def unbounded(step, pred: float, H, newton: bool = False) -> Candidate:
    """A candidate outside the trust region's radii (a final, boundary or covariance step), its length
    scaled by √|diag H| as the radii are."""
    return Candidate(step, pred, scaled_norm(step, H), np.inf, newton)
