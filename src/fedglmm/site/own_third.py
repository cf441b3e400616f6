"""The third derivatives of a site's own fit, sent beside it for the hybrid's start and step model
(:mod:`fedglmm.site.own_fit`): differences of the engine's analytic Hessian, half a standard error apart;
and those at a final point, where the coordinator asks for them (:func:`final_third`)."""
from __future__ import annotations

import numpy as np

from ..likelihood.linalg import pack_third, symmetric_third

THIRD_STEP = 0.5      # the differences for the third derivatives: half a standard error each way
FINAL_STEP = 1e-4     # ... at a final point: this far (internal scale, relative beyond 1)


def third_derivatives(engine, x: np.ndarray, info: np.ndarray) -> np.ndarray | None:
    """The third derivatives of −ℓ at ``x`` (the engine's internal scale), from central differences of its
    analytic Hessian half a standard error either side in each coordinate (2P evaluations from
    warm modes), made symmetric; None if an evaluation fails.  Over that range they stand for the change of
    curvature that a quadratic summary of the fit misses (the skew of a variance's likelihood above all)."""
    try:
        se = np.sqrt(np.maximum(np.diag(np.linalg.inv(info)), 0.0))
    except np.linalg.LinAlgError:
        return None
    P = len(x)
    D = np.empty((P, P, P))
    for k in range(P):
        h = THIRD_STEP * se[k] if se[k] > 0 else 1e-3
        e = np.zeros(P)
        e[k] = h
        hp, hm = engine.sums(x + e)["hess"], engine.sums(x - e)["hess"]
        D[:, :, k] = -(np.asarray(hp) - np.asarray(hm)) / (2.0 * h)
    if not np.all(np.isfinite(D)):
        return None
    return symmetric_third(D)


def covariance_third(engine, x: np.ndarray, H: np.ndarray, idx) -> np.ndarray | None:
    """The third derivatives of −ℓ at ``x`` (internal scale; ``H`` its Hessian there) with an index among the
    positions ``idx`` (covariance parameters; T[a, b, c] from the slice of its last index there), by forward
    differences of the analytic Hessian half a standard error along each (len(idx) evaluations); the others 0.
    A likelihood's skew with few levels is in their variances: the full derivatives (2·len(x) evaluations)
    started the 3-site splits of parity_multilevel.py no closer (coordinator.own_combination.factor_log_start)."""
    se = np.sqrt(np.maximum(np.diag(np.linalg.pinv(H)), 0.0))
    P = len(x)
    D = _forward(engine, x, H, idx, np.where(se > 0, THIRD_STEP * se, 1e-3))
    on = np.isin(np.arange(P), idx)
    a, b, c = on[:, None, None], on[None, :, None], on[None, None, :]
    T = np.where(c, D, np.where(b, np.einsum("acb->abc", D), np.where(a, np.einsum("bca->abc", D), 0.0)))
    return symmetric_third(T) if len(idx) and np.all(np.isfinite(T)) else None


def final_third(engine, x: np.ndarray, req: dict, reply: dict) -> None:
    """A ``finalize`` request that asks for them (``third``) gets the third derivatives of ℓ at its point in
    ``reply`` (``third``): forward differences of the engine's analytic Hessian, 1e-4 in each coordinate
    (internal scale; relative beyond 1), P evaluations from warm modes, made symmetric, its P(P + 1)(P + 2)/6
    distinct entries (:func:`~fedglmm.likelihood.linalg.pack_third`) -- sums over the site's rows, as the
    Hessian is.  The coordinator, whose final round left a decrement just above its tolerance, takes its
    last step to third order with them instead of one more round
    (:meth:`~fedglmm.likelihood.newton_end.Ending._third_last`).  Not under secure aggregation, whose masks
    cover the sums' usual keys alone."""
    if not req.get("third") or "secagg" in req or "hess" not in reply:
        return
    P = len(x)
    D = -_forward(engine, x, -np.asarray(reply["hess"], float), range(P), FINAL_STEP * np.maximum(1.0, np.abs(x)))
    if np.all(np.isfinite(D)):
        reply["third"] = pack_third(symmetric_third(D))


def _forward(engine, x: np.ndarray, H: np.ndarray, idx, steps: np.ndarray) -> np.ndarray:
    """D[:, :, t] for t in ``idx``: forward differences of −ℓ's Hessian (``H`` at ``x``) ``steps[t]`` along
    coordinate t (one engine evaluation each); the other slices 0."""
    P = len(x)
    D = np.zeros((P, P, P))
    for t in idx:
        h = steps[t]
        D[:, :, t] = (-np.asarray(engine.sums(x + h * np.eye(P)[t])["hess"]) - H) / h
    return D
