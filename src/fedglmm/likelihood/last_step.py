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

The information and the log-likelihood at the estimate are moved there over that step
(:func:`information_at_estimate`, :func:`loglik_at_estimate`).
"""
from __future__ import annotations

import numpy as np


def last_step(cur, prev, cov, step: np.ndarray) -> np.ndarray:
    """The step from the final point ``cur`` (x, g, H) to the solution, given the previous accepted point
    ``prev`` (or None), the covariance steps ``cov`` (or None) and the Newton step ``step`` (kept as it is
    where its decrement is below 1e-10: the other models could not tell it apart)."""
    if -(cur.g @ step) > 1e-10:
        st = covariance_step(cur, prev, cov)
        if st is not None:
            return st[0]
    return third_order(cur, prev, step)


def covariance_step(cur, prev, cov, ratio: float = 1.0) -> tuple | None:
    """(step, predicted decrease) of the Newton step in the covariance's entries from ``cur`` (x, g, H) where the
    quadratic model there predicts the gradient at the previous accepted point ``prev`` better than the model in θ
    does (its miss, in the norm of H⁻¹, below ``ratio`` times the other's); otherwise (or without ``prev`` or
    ``cov``, or off the positive-definite cone) None."""
    if cov is None or prev is None or prev.g.shape != cur.g.shape:
        return None
    m = cov.model(cur.x, cur.g, cur.H)          # (the model in Σ's entries, for the step and the test)
    st = cov.step(cur.x, cur.g, cur.H, m) if m is not None else None
    pred = cov.predicted_gradient(cur.x, cur.g, cur.H, prev.x, prev.g, m) if st is not None else None
    if pred is None:
        return None
    plain = prev.g - (cur.g + cur.H @ (prev.x - cur.x))
    miss = [float(r @ np.linalg.solve(cur.H, r)) for r in (plain, prev.g - pred)]
    return st if miss[1] < ratio * miss[0] else None


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


def information_at_estimate(opt, info, estimate):
    """The information at the estimate rather than at the last point visited: its change over the final
    step s.  A step model with third derivatives of its own (the pseudo-data surrogate) gives its Hessian's
    change over s; what the model misses, the change of (Hessian − model's Hessian) between the last two
    points d, scaled to the component of s along d, adds (a secant estimate of the remaining third
    derivative; without a model the whole change).  After a last step to third order: that T's change over s, and
    the second-order change along d too (:func:`_second_order`).  Kept only if it stays positive definite."""
    if opt.point is None:
        return info
    if opt.third_used is not None:      # the fit ended on a last step to third order: F's own change over it
        corrected = info + opt.third_used @ (estimate - opt.point) + _second_order(opt, estimate)
        if np.all(np.isfinite(corrected)) and np.all(np.linalg.eigvalsh(corrected) > 0):
            return corrected
    change = getattr(opt.model, "hessian_change", None)
    parts = []
    model = change(opt.point, estimate) if change is not None else None
    if model is not None and np.all(np.isfinite(model)):
        parts.append(model)
    prev = opt.previous
    if prev is not None:
        d = opt.point - prev.x
        dd = d @ d
        t = float((estimate - opt.point) @ d / dd) if dd > 0 else np.inf
        if abs(t) <= 1.0:
            rest = opt.current.H - prev.H
            along = change(prev.x, opt.point) if change is not None and parts else None
            if along is not None and np.all(np.isfinite(along)):
                rest = rest - along
            parts.append(t * rest)
    for k in range(len(parts), 0, -1):
        corrected = info + sum(parts[:k])
        try:
            np.linalg.cholesky(corrected)
            return corrected
        except np.linalg.LinAlgError:
            continue
    return info


def _second_order(opt, estimate) -> np.ndarray | float:
    """The Hessian's second-order change over the last step s, ½Q[s, s], along the last move d from the point
    before (Taylor from the final point: H(x − d) = H − T[d] + ½Q[d, d]): (dᵀHs / dᵀHd)² (H(x − d) − H + T[d]),
    with T the final point's (``third_here``) and full (one grouping factor: ``third_dear`` off) and s no longer
    than d along it.  Without it a fit that ended from a final point 1e-8 to 3e-8 above the optimum by a step to
    third order left standard errors as far off (sim_toenail_la pooled by the iterative method, over 20 sites by
    the hybrid: 1.3e-8 and 3.2e-8; with it 5.9e-10 and 2.7e-10)."""
    quartic = getattr(opt, "final_quartic", None)
    if opt.third_dear or not getattr(opt, "third_here", False):
        return 0.0
    s, H = estimate - opt.point, opt.current.H
    if quartic is not None:             # the sites' Q[v, v] along the way the last step was predicted to go
        v, Q = quartic
        a = float(s @ H @ v) / float(v @ H @ v)
        return 0.5 * a * a * Q
    d, half = quartic_along_move(opt.previous, opt.point, H, opt.third_used)
    if d is None:
        return 0.0
    dd = float(d @ H @ d)
    a = float(s @ H @ d) / dd if dd > 0 else np.inf
    return a * a * half if abs(a) <= 1.0 else 0.0


def quartic_along_move(prev, x: np.ndarray, H: np.ndarray, T: np.ndarray) -> tuple:
    """(d, ½Q[d, d]): the last move d from the point before ``prev`` to x and F's fourth derivatives along it,
    from the Hessians at both ends (H at x) and T at x (Taylor from there: H(x − d) = H − T[d] + ½Q[d, d]);
    (None, None) without a point before."""
    if prev is None:
        return None, None
    d = x - prev.x
    return d, prev.H - H + T @ d


def loglik_at_estimate(s: dict, step: np.ndarray, opt) -> float:
    """The log-likelihood at the estimate, the last point (its sums ``s``) plus its last step: to second order, and
    to third where F's third derivatives there came with the final round (``third_here``; from a decrement up to
    THIRD_LAST, 1e-5, the cubic term was up to 1.7e-9: sim_pois_huge as a negative binomial over 3 sites)."""
    cubic = opt.third_used if getattr(opt, "third_here", False) and opt.third_used is not None else None
    third = np.einsum("ijk,i,j,k->", cubic, step, step, step) / 6.0 if cubic is not None else 0.0
    return float(s["value"] + s["grad"] @ step + 0.5 * step @ s["hess"] @ step - third)
