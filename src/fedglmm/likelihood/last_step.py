"""The last step of the coordinator's Newton iteration: from the final point to the solution.

The final round brings the value, gradient and Hessian at the final point x; the estimate is x plus one
more step, computed here without another round.  Newton's step leaves an error of second order, c·|s|²,
which is small against the tolerance where the objective is nearly quadratic, but not where it is far from
it (a nearly singular covariance, an observation-level effect): there the error reached 1e-7 relative on
the reference cases, continuing Newton to machine precision being the measure.  Two better models use what
the iteration already has -- the previous point's gradient and Hessian:

* to third order (:func:`third_order`): the change of the Hessian along the last step d gives the third
  derivatives along d, T·d ≈ H(x) − H(x_prev); Chebyshev's step s − ½H⁻¹T[s, s], with T[s, s] taken as
  (dᵀs/dᵀd)·(T·d)·s (exact where s runs along d), leaves an error of third order;
* in the covariance's entries (:class:`~fedglmm.likelihood.covariance_steps.CovarianceSteps`): the step
  of the quadratic model in Σ = ΛΛᵀ, taken where that model predicts the gradient at the previous point
  better than the model in θ does.
"""
from __future__ import annotations

import numpy as np


def last_step(cur, prev, cov, step: np.ndarray) -> np.ndarray:
    """The step from the final point ``cur`` (x, g, H) to the solution, given the previous accepted point
    ``prev`` (or None), the covariance steps ``cov`` (or None) and the Newton step ``step`` (kept as it is
    where its decrement is below 1e-10: the other models could not tell it apart)."""
    if cov is not None and prev is not None and prev.g.shape == cur.g.shape and -(cur.g @ step) > 1e-10:
        m = cov.model(cur.x, cur.g, cur.H)          # (the model in Σ's entries, for the step and the test)
        st = cov.step(cur.x, cur.g, cur.H, m) if m is not None else None
        pred = cov.predicted_gradient(cur.x, cur.g, cur.H, prev.x, prev.g, m) if st is not None else None
        if pred is not None:
            plain = prev.g - (cur.g + cur.H @ (prev.x - cur.x))
            miss = [float(r @ np.linalg.solve(cur.H, r)) for r in (plain, prev.g - pred)]
            if miss[1] < miss[0]:
                return st[0]
    return third_order(cur, prev, step)


def third_order(cur, prev, step: np.ndarray) -> np.ndarray:
    """Newton's step corrected to third order along the last step (e.g. 1.2e-8 → 1.5e-9 relative on a
    poisson model with two factors and an observation-level effect); kept only where the correction is at
    most half the step and the step is not already below the objective's resolution."""
    dec = -(cur.g @ step)
    if prev is None or prev.H.shape != cur.H.shape or not dec > 1e-10:
        return step
    d = cur.x - prev.x
    dd = float(d @ d)
    if not dd > 0:
        return step
    try:
        corr = 0.5 * (d @ step / dd) * np.linalg.solve(cur.H, (cur.H - prev.H) @ step)
    except np.linalg.LinAlgError:
        return step
    if not np.all(np.isfinite(corr)) or corr @ cur.H @ corr > 0.25 * dec:
        return step
    return step - corr
