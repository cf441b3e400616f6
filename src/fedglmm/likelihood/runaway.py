"""Estimates that run off: the check that keeps an impossible result from being reported as converged.

Under complete or quasi-complete separation of a binary (or an all-zero poisson) outcome the maximum
likelihood estimate does not exist: along some direction d the log-likelihood keeps rising towards a
finite supremum, and Newton's method walks along d with steps that do not shrink (each step moves the
linear predictor of the separated rows by about one unit: η runs to ±∞ while their weights μ(1−μ) fall
like e^{−|η|}).  A variance that runs off to infinity (every group all successes or all failures) looks
the same along θ.  The iteration then "converges" only because the gain per step falls below the
tolerance, at estimates such as 3900 ± 880000.

The signature, read from the last two accepted points x₀, x₁ of the iteration (internal scale, so every
coordinate is in standard-deviation units of its column):

* **steady**: at x₁ the Newton step along the last move d = x₁ − x₀ is still at least a fifth of that
  move (a converging Newton iteration ends with steps many orders of magnitude shorter than the last);
* **flattening**: the curvature of −ℓ along d fell by at least a fifth between x₀ and x₁ (near a true
  optimum it is constant to many digits; on an exponential tail it falls by e⁻¹ per step);
* **outward and undetermined**: the coordinates that carry the move (at least 30 % of its largest
  component) grow in magnitude and lie within half a standard error of zero (the standard errors grow
  faster than the estimates, Hauck & Donner 1977).  The intercept, which on the internal scale moves
  with every centred column, is named only when no other fixed effect is.

A variance can also end at a spurious finite point of the Laplace approximation while the likelihood
rises towards its supremum at infinity (groups all successes or all failures): a standard deviation of
a random effect above 15 on the scale of the linear predictor (η varying by e¹⁵ between groups) that the
data do not distinguish from larger ones (within three standard errors of zero) is named too.

The check needs no further round and no row: it uses only the sums the fit already has.  (Detecting
separation from the rows, as Konis's linear programme does, is impossible at a coordinator that never
sees them.)
"""
from __future__ import annotations

import numpy as np

from ..model.spec import diagonal_positions

STEADY = 0.2          # final step along the last move, relative to that move
FLATTENING = 0.8      # curvature ratio along the last move below which the surface is flattening
SHARE = 0.3           # share of the largest component for a coordinate to be named
WALD = 0.5            # |estimate| / SE below which a moving coordinate is not determined by the data
MAX_SD = 15.0         # a random effect's SD on the linear predictor's scale beyond which η is deterministic


def runaway(path, estimate: np.ndarray, info: np.ndarray | None, p: int, diagonal, intercept: int | None
            ) -> np.ndarray:
    """Indices of the coordinates of ``estimate`` (φ = (γ, θ̃), ``p`` fixed effects) that run off.

    ``path`` is ``(x0, H0, x1, H1, g1)``: the last two accepted points, the Hessians of −ℓ there and the
    gradient at x1 (:attr:`fedglmm.likelihood.fit.Estimate.path`); ``info``: the information at the
    estimate; ``diagonal``: positions in θ̃ of the standard deviations; ``intercept``: its position."""
    est = np.asarray(estimate, float)
    se = _standard_errors(info, len(est))
    sd = p + np.asarray(diagonal, dtype=np.int64)
    out = set(int(i) for i in sd[(np.abs(est[sd]) > MAX_SD) & (np.abs(est[sd]) < 3.0 * se[sd])])
    if path is not None:
        out |= set(_moving(path, est, se).tolist())
    fixed = [i for i in out if i < p and i != intercept]
    if intercept is not None and intercept in out and fixed:
        out.discard(intercept)
    return np.array(sorted(out), dtype=np.int64)


def _moving(path, est: np.ndarray, se: np.ndarray) -> np.ndarray:
    """The coordinates walking off along a flattening direction (see the module docstring)."""
    none = np.zeros(0, dtype=np.int64)
    x0, H0, x1, H1, g1 = (np.asarray(a, float) for a in path)
    move = x1 - x0
    size = float(np.linalg.norm(move))
    if not (size > 0 and np.all(np.isfinite(move)) and np.all(np.isfinite(est))):
        return none
    d = move / size
    c0, c1 = float(d @ H0 @ d), float(d @ H1 @ d)
    if not (c0 > 0 and 0 < c1 <= FLATTENING * c0):
        return none
    if not -float(g1 @ d) / c1 >= STEADY * size:          # the Newton step along d at x1
        return none
    carries = np.abs(d) >= SHARE * np.max(np.abs(d))
    growing = np.abs(est) > np.abs(x0)
    return np.flatnonzero(carries & growing & (np.abs(est) < WALD * se))


def _standard_errors(info, k: int) -> np.ndarray:
    if info is None:
        return np.full(k, np.inf)
    try:
        with np.errstate(all="ignore"):
            d = np.diag(np.linalg.inv(np.asarray(info, float)))
    except np.linalg.LinAlgError:
        return np.full(k, np.inf)
    return np.where(np.isfinite(d) & (d > 0), np.sqrt(np.abs(d)), np.inf)


def ran_off(est, names, mask) -> bool:
    """Whether a local fit's estimate (:class:`~fedglmm.likelihood.fit.Estimate`; ``names``: the fixed effects',
    ``mask``: the covariance's pattern) runs off (:func:`runaway`) in a fixed effect or a standard deviation:
    its iteration "converged" only as the gain per step fell below the tolerance, and it is no estimate (a
    dispersion growing without bound is the family's boundary, a covariance drifting at a zero SD a singular
    fit: as :func:`~fedglmm.coordinator.assemble.runaway_message` reads them)."""
    if est.info is None:
        return False
    names, p = list(names), len(est.gamma)
    diagonal = diagonal_positions(mask)
    idx = runaway(est.path, np.r_[est.gamma, est.theta, est.disp], est.info, p, diagonal,
                  names.index("Intercept") if "Intercept" in names else None)
    return bool(np.any(idx < p) or np.any(np.isin(idx, p + diagonal)))
