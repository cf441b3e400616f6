"""Third-order steps for a gaussian model with several grouping factors.

The sites' sums A, b, c, d come with θ-derivatives of the first order (analytic), the second (central
differences of the first) and the third (second differences of the first: the central points give the
entries with at most two distinct indices, two more points per pair of θ's those with three; see
:meth:`~fedglmm.likelihood.lmm_sparse.MultiLMMSums.evaluate`).
From them the coordinator has the third derivatives T of the profiled criterion F(θ) at each point the
sites evaluated (:func:`profiled_third`: its Hessian at θ ± h e_t from the sums carried there by their
Taylor series, differenced), and proposes the step of the cubic model

    m(s) = gᵀs + ½ sᵀHs + ⅙ T[s, s, s],

whose minimum solves g + Hs + ½ T[s, s] = 0 (:func:`cubic_step`; Chebyshev's method where the model is
solved to first order).  Newton's error after a step is of the second order in the distance
to the optimum, this one's of the third: on the gaussian splits of ``benchmarks/parity_multilevel.py``
it takes the decrement from 0.24 to 1e-3 where Newton's step leaves 3e-3, and from there below 1e-9.
"""
from __future__ import annotations

import numpy as np

from .lmm import profiled_deviance
from .start_choice import newton_step
from .third_steps import cubic_decrease

KEYS = ("A", "b", "c", "d")
STEP = 1e-4          # the coordinator's difference of the profiled Hessian: h_t = STEP (1 + |θ_t|)


def _carried(s: dict, t: int, h: float) -> dict:
    """The sums at θ + h e_t by their Taylor series to the third order (their derivatives to the first)."""
    out = dict(s)
    for key in KEYS:
        d1, d2, d3 = (np.asarray(s[pre + key], float) for pre in ("d", "d2", "d3"))
        out[key] = s[key] + h * d1[t] + 0.5 * h * h * d2[t, t] + h ** 3 / 6.0 * d3[t, t, t]
        out["d" + key] = d1 + h * d2[:, t] + 0.5 * h * h * d3[:, t, t]
        out["d2" + key] = d2 + h * d3[:, :, t]
    return out


def profiled_third(s: dict, theta: np.ndarray, reml: bool) -> np.ndarray | None:
    """The third derivatives (k, k, k) of ½ × the profiled (RE)ML deviance at θ from the summed sums ``s``
    (with their third derivatives, keys ``d3A``...), or None where they are missing or not finite."""
    if "d3A" not in s:
        return None
    k = len(s["dd"])
    T = np.empty((k, k, k))
    try:
        for t in range(k):
            h = STEP * (1.0 + abs(float(theta[t])))
            up = profiled_deviance(_carried(s, t, h), reml).hess
            dn = profiled_deviance(_carried(s, t, -h), reml).hess
            T[:, :, t] = 0.25 * (up - dn) / h                 # ½ d/dθ_t of the deviance's Hessian
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return None
    T = (T + T.transpose(1, 2, 0) + T.transpose(2, 0, 1)) / 3.0
    return T if np.all(np.isfinite(T)) else None


def cubic_step(g: np.ndarray, H: np.ndarray, T: np.ndarray, iterations: int = 30):
    """(s, predicted decrease) at the minimum of the cubic model nearest the Newton step: Newton's method on
    its gradient g + Hs + ½ T[s, s] (Jacobian H + T[s]) from that step; None where it leaves twice the Newton
    step's length, does not settle, or ends where the model's Hessian is not positive definite (the model
    then says little about where F's minimum lies)."""
    newton = newton_step(g, H)
    if newton is None:
        return None
    norm = lambda v: float(np.sqrt(max(v @ H @ v, 0.0)))    # noqa: E731
    reach = 2.0 * norm(newton)
    s = newton
    try:
        for _ in range(iterations):
            J = H + np.einsum("abc,c->ab", T, s)
            d = -np.linalg.solve(J, g + H @ s + 0.5 * np.einsum("abc,b,c->a", T, s, s))
            s = s + d
            if not np.all(np.isfinite(s)) or norm(s) > reach:
                return None
            if norm(d) <= 1e-12 * max(reach, 1e-300):
                break
        else:
            return None
        np.linalg.cholesky(H + np.einsum("abc,c->ab", T, s))
    except np.linalg.LinAlgError:
        return None
    pred = cubic_decrease(g, H, T, s)
    return (s, pred) if pred > 0 else None


def cubic_model(sums_at, reml: bool):
    """A step model for :class:`~fedglmm.likelihood.newton.TrustRegionNewton` (its ``model``): the cubic
    model's step at a point whose sums ``sums_at(x)`` returns (None: no step)."""

    def model(x, f, g, H):
        s = sums_at(x)
        T = profiled_third(s, x, reml) if s is not None else None
        return cubic_step(np.asarray(g, float), np.asarray(H, float), T) if T is not None else None

    # from a decrement above 1 the Newton step goes beside the cubic one: the fourth-order terms may be large
    # there (scotssec by ML over 3 sites, decrement 1.2: the cubic step left 1.8e-2, Newton's 2.4e-3)
    model.newton_beside = 1.0
    return model
