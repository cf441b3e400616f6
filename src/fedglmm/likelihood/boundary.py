"""The step for coordinates a Newton iteration approaches zero in, where F is even in each (a standard
deviation, a diagonal entry of a covariance's Cholesky factor): :func:`boundary_step`.

Near a zero optimum F behaves like the fourth power of such a coordinate, so Newton only shrinks it by a
fraction round after round.  F is smooth in its square u = x² though (F is even in x), and the quadratic
model in u is the right one there: the coupling of x with the other coordinates is odd in x, so the others'
gradient changes by half as much on the way to x = 0 as the model in x says (H_fx·x/2, not H_fx·x).
"""
from __future__ import annotations

import numpy as np


def boundary_step(x: np.ndarray, g: np.ndarray, H: np.ndarray, newton: np.ndarray, even, before=None) -> tuple | None:
    """Where the Newton step shrinks coordinates of ``even`` by more than half -- or by more than a quarter where
    the move from ``before`` (the point accepted before x) shrank them by a quarter too -- the step of the
    quadratic model of F in u = x² for those coordinates (and the rest as they are), onto u = 0 for each whose
    model step leaves u ≤ 0, as (step in x, predicted decrease); None if none shrinks so or the model in u is
    not convex.  Where F grows in x like x⁴ more than x², Newton's step in x shrinks it by a third a round
    (stress_methods.py seed 28 fit 80: Λ₂₂ 0.31, 0.22, 0.14, 0.03, 0.005, 0 over six rounds, now five); at a
    first shrink the model in u is not trusted that far (small_slope_rounds.py seed 36: it landed on 0 for an
    optimum of 0.019, and leaving 0 took five rounds more)."""
    factor = np.full(len(x), 0.5)
    if before is not None:
        factor[np.abs(x) < 0.75 * np.abs(before)] = 0.75
    hit = np.array([i for i in even if abs(x[i]) > 1e-8 and abs(x[i] + newton[i]) < factor[i] * abs(x[i])], int)
    if not hit.size:
        return None
    # F(x(u)) with x = √u at the hit coordinates: gradient D g, Hessian D H D + the second derivative of x(u)
    scale = np.ones_like(x)
    scale[hit] = 1.0 / (2.0 * x[hit])
    gu = scale * g
    Hu = H * np.outer(scale, scale)
    Hu[hit, hit] -= g[hit] / (4.0 * x[hit] ** 3)
    u = x[hit] ** 2
    zero = np.zeros(len(x), bool)
    for _ in range(hit.size + 1):
        s = np.zeros_like(x)
        s[hit[zero[hit]]] = -u[zero[hit]]
        free = ~zero
        try:
            c = np.linalg.cholesky(Hu[np.ix_(free, free)])
        except np.linalg.LinAlgError:
            return None
        rhs = gu[free] + Hu[np.ix_(free, ~free)] @ s[~free]
        s[free] = -np.linalg.solve(c.T, np.linalg.solve(c, rhs))
        cross = hit[(u + s[hit] <= 0.0) & ~zero[hit]]
        if not cross.size:
            break
        zero[cross] = True
    new = x.copy()
    free = np.setdiff1d(np.arange(len(x)), hit)
    new[free] = x[free] + s[free]
    new[hit] = np.sign(x[hit]) * np.sqrt(np.maximum(u + s[hit], 0.0))
    new[hit[zero[hit]]] = 0.0
    return new - x, float(-(gu @ s + 0.5 * s @ Hu @ s))


def boundary_last(x: np.ndarray, g: np.ndarray, H: np.ndarray, newton: np.ndarray, even, tol: float):
    """At the point the iteration would stop: where the Newton step moves coordinates of ``even`` towards 0,
    the model in their squares' step (:func:`boundary_step`, onto 0 where its minimum lies beyond), if it
    promises more than twice Newton's (and 1e-3 tol) and differs from it by more than ``tol`` in the norm of H -- near a
    zero SD on a flat ridge (Λ₁₁ = 4e-4 beside a slope: tests/test_rounds.py) the decrement was below tol
    with the logLik still 3.5e-8 from its optimum, the model in the square promising 11 times Newton's
    gain (where it promised 1.4 times, on stress_methods seed 5 fit 0, Newton's last step did as well and
    the round cost two; 1e-12 is not worth one).  (step, predicted decrease) or None."""
    hit = [i for i in even if abs(x[i]) > 1e-8 and x[i] * newton[i] < 0]
    if not hit:
        return None
    toward = np.zeros_like(x)
    toward[hit] = -x[hit]
    out = boundary_step(x, g, H, toward, hit)
    if out is None:
        return None
    d = out[0] - newton
    more = out[1] > max(-2.0 * (g @ newton + 0.5 * newton @ H @ newton), 1e-3 * tol)
    return out if more and d @ H @ d > tol ** 2 else None


def face_decrement(cur, even) -> float:
    """The Newton decrement within the face of the coordinates of ``even`` that are exactly 0 at ``cur`` (x, g,
    H, with :func:`~fedglmm.likelihood.steps.even_at_zero`'s symmetry: their gradient and cross terms 0), where H
    is positive definite in the other coordinates -- its negative curvature lies along those zeros alone; ∞
    otherwise.  A point reached on such a face (a variance set to 0, :func:`face_step`) has no Newton step, but
    the steps along the face converge as Newton's do, and this is the decrement they start from."""
    zero = np.isin(np.arange(len(cur.x)), [i for i in even if cur.x[i] == 0.0])
    if not zero.any():
        return np.inf
    try:
        c = np.linalg.cholesky(cur.H[np.ix_(~zero, ~zero)])
    except np.linalg.LinAlgError:
        return np.inf
    y = np.linalg.solve(c, cur.g[~zero])
    return float(y @ y)


def face_step(x: np.ndarray, g: np.ndarray, H: np.ndarray, even, concentrated: float = 0.9):
    """Where H has one negative eigenvalue and its eigenvector lies (a share of at least ``concentrated``
    of its square) along one coordinate of ``even``: the step to that coordinate's zero (none where it is 0
    already: F is even in it there), the others to the minimum of the quadratic model in its square there
    (their gradient moved by half the coupling, as in :func:`boundary_step`), as (step, predicted decrease);
    None otherwise, where the others' Hessian is not positive definite, or where the step is 0.  Near a
    singular Σ the curvature in such a coordinate can turn negative within a hair of 0 (a slope's SD at
    2.5e-6 beside an intercept's SD at 0.02 and a correlation of 1) while F is least at 0; the trust-region
    steps of the indefinite model then leave the zero, and come back rounds later.  On the face already (the
    coordinate at 0): the others' step to their minimum there.  As a candidate of the coordinator's Newton
    rounds (:meth:`~fedglmm.likelihood.newton.TrustRegionNewton._face`): benchmarks/stress_methods.py, 2000 fits
    (seeds 1-20), 8 fits 1-3 rounds shorter (seed 16 fit 80 8 -> 5, seed 13 fit 0 8 -> 6), none longer; with
    several grouping factors, grouseticks' nested factors one location per site 7 -> 6 rounds (the start's
    Hessian indefinite along LOCATION's SD, whose optimum is 0: onto the face from 4.5 above the optimum to
    0.16, then along it to 1e-3), parity_multilevel.py over 3 sites 237 -> 235 and one site per unit
    256 -> 254, the golden file's iterative grouseticks_nested 8 -> 7 (standard errors 4e-8 -> 7e-9 from the
    fit continued to machine precision), stress_methods.py's iterative fits 698 -> 694, none longer."""
    lam, Q = np.linalg.eigh(H)
    if not (lam[0] < 0 <= lam[1] if len(lam) > 1 else lam[0] < 0):
        return None
    i = int(np.argmax(np.abs(Q[:, 0])))
    if i not in even or Q[i, 0] ** 2 < concentrated:
        return None
    free = np.r_[0:i, i + 1:len(x)]
    try:
        c = np.linalg.cholesky(H[np.ix_(free, free)])
    except np.linalg.LinAlgError:
        return None
    s = np.zeros_like(x)
    s[i] = -x[i]
    s[free] = -np.linalg.solve(c.T, np.linalg.solve(c, g[free] + 0.5 * H[free, i] * s[i]))
    if not np.any(s):
        return None                      # (at the face's minimum already)
    return s, max(float(-(g @ s + 0.5 * s @ H @ s)), 1e-300)
