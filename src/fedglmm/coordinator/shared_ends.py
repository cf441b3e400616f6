"""The ends of the shared effects v's iteration in a GLMM with levels at several sites
(:mod:`fedglmm.coordinator.shared_glmm_rounds`): where the first round begins and where its grid puts each
level's mode; when a final point's value and gradient are settled.

From v = 0, and with one grouping factor each level's intercept at a grid of values beside, Newton's steps in
v took 2-4 rounds to reach v's mode at the start (``benchmarks/stress_shared.py``); the fit's Newton rounds
in φ begin only once it is reached.  Two things shorten that: a pseudo-data fit's modes, where each shared
level's moments at every site went (:func:`modes_to_v`), and the grid's points read as a bracket of each
level's mode (:func:`bracketed`)."""
from __future__ import annotations

import numpy as np

from ..likelihood.glmm_shared_pool import SharedPoint
from ..likelihood.shared import SharedLayout


def modes_to_v(layout: SharedLayout, zcols: dict, zs: np.ndarray, L: np.ndarray, modes: dict,
               condsd: dict | None = None) -> tuple:
    """v from ``modes`` (user's scale, a DataFrame of levels × Z columns per factor: a pseudo-data fit's,
    whose stand-ins of each shared level drew on its moments at every site): b̃ = b · zs on the internal
    scale, v = Λ_v⁻¹ b̃ (``L``: Λ_v at the start; least squares where it is singular); 0 for a level they
    lack.  With ``condsd`` (the same fit's conditional SDs) also Var(b̃ | y) over v's entries, the diagonal
    of Γ = Λ C⁻¹ Λᵀ (None where one is missing or 0): without it the first round's Γ̂ would be the prior's
    ΛΛᵀ, and the gradient and Hessian of a start whose v was already near its mode wrong (the start's
    Newton decrement 10.4 for 0.004 on stress_shared.py's fit 44)."""
    b, var = np.zeros(layout.Q), np.full(layout.Q, np.nan)
    for f in layout.factors:
        m = modes.get(f)
        if m is None:
            continue
        levels = layout.levels[f]
        have = np.isin(np.asarray(levels, dtype=object), m.index.map(str).to_numpy(dtype=object))
        if not have.any():
            continue
        idx = layout.columns(f, np.flatnonzero(have))
        named = [lv for lv, h in zip(levels, have) if h]
        b[idx] = m.set_axis(m.index.map(str)).reindex(named).to_numpy(float) * zs[zcols[f]]
        sd = (condsd or {}).get(f)
        if sd is not None:
            var[idx] = (sd.set_axis(sd.index.map(str)).reindex(named).to_numpy(float) * zs[zcols[f]]) ** 2
    v = np.linalg.lstsq(L, np.where(np.isfinite(b), b, 0.0), rcond=None)[0]
    v = v if np.all(np.isfinite(v)) else np.zeros(layout.Q)
    return v, (var if np.all(np.isfinite(var) & (var > 0)) else None)


def bracketed(pts: list, blocks: np.ndarray):
    """Levels whose v's mode the first round's grid brackets (its points differ only in each level's first
    effect: :meth:`~fedglmm.coordinator.shared_glmm_rounds.SharedGLMMEvaluator._grid`), that mode, and C and
    the tangent τ = C⁻¹F_vφ there: (levels, v (n, q), C (n, q, q), τ (n, q, P)), or None without any.
    Between the two neighbouring points where F_v's first entry changes sign, the root s of its cubic Hermite
    interpolant (slopes −C's first column at both ends), then a Newton step in the others with C at s: C − I
    interpolated geometrically in its diagonal (a poisson level's curvature grows as e^b), its correlations
    linearly, F_vφ linearly.  A Newton step from the grid point nearest the mode missed it by a share of the
    grid's spacing where F_v is far from linear (a poisson level's intercept 1.68 for 1.61 from 2: a
    decrement of 1.1 at C = 226), and the start's v took one more round; C and τ from the point nearest were
    too far off for the next round's prediction Γ̂ = ΛC⁻¹Λᵀ (which the sites contract ∂S with) and its
    difference points."""
    if len(pts) < 3:
        return None
    V = np.stack([t.v[blocks] for t in pts])                                           # (K, L, q)
    Cs = np.stack([t.C[blocks[:, :, None], blocks[:, None, :]] for t in pts])          # (K, L, q, q)
    G = np.einsum("klqr,klr->klq", Cs, np.stack([t.dv[blocks] for t in pts]))          # F_v
    Fvp = np.einsum("klqr,klrp->klqp", Cs, np.stack([t.tau[blocks] for t in pts]))     # F_vφ
    same = np.all(np.abs(V[:, :, 1:] - V[:1, :, 1:]) <= 1e-12 * (1.0 + np.abs(V[:1, :, 1:])), axis=(0, 2))
    order = np.argsort(V[:, :, 0], axis=0)
    t = np.take_along_axis(V[:, :, 0], order, 0)
    g = np.take_along_axis(G, order[:, :, None], 0)
    C = np.take_along_axis(Cs, order[:, :, None, None], 0)
    Fvp = np.take_along_axis(Fvp, order[:, :, None, None], 0)
    cross = (t[1:] > t[:-1]) & (g[:-1, :, 0] > 0.0) & (g[1:, :, 0] <= 0.0)             # (K-1, L)
    levels = np.flatnonzero(same & cross.any(axis=0))
    if not len(levels):
        return None
    a = np.argmax(cross[:, levels], axis=0)
    ta, tb = t[a, levels], t[a + 1, levels]
    ga, gb, Ca, Cb = g[a, levels], g[a + 1, levels], C[a, levels], C[a + 1, levels]
    h = (tb - ta)[:, None]

    def g_at(u):
        u = u[:, None]
        return ((2 * u**3 - 3 * u**2 + 1) * ga - (u**3 - 2 * u**2 + u) * h * Ca[:, :, 0]
                + (-2 * u**3 + 3 * u**2) * gb - (u**3 - u**2) * h * Cb[:, :, 0])

    lo, hi = np.zeros(len(levels)), np.ones(len(levels))
    for _ in range(40):                           # the bracket's root by bisection, every level at once
        mid = 0.5 * (lo + hi)
        up = g_at(mid)[:, 0] > 0.0
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    u = 0.5 * (lo + hi)
    I = np.eye(Ca.shape[-1])
    da, db = np.diagonal(Ca - I, axis1=1, axis2=2), np.diagonal(Cb - I, axis1=1, axis2=2)
    ok = np.all((da > 0) & (db > 0), axis=1)
    d = np.where(ok[:, None], np.abs(da) ** (1 - u[:, None]) * np.abs(db) ** u[:, None],
                 (1 - u[:, None]) * da + u[:, None] * db)
    ra = (Ca - I) / np.sqrt(np.abs(da[:, :, None] * da[:, None, :]) + 1e-300)
    rb = (Cb - I) / np.sqrt(np.abs(db[:, :, None] * db[:, None, :]) + 1e-300)
    r = (1 - u[:, None, None]) * ra + u[:, None, None] * rb
    Cu = I + r * np.sqrt(np.abs(d[:, :, None] * d[:, None, :]))
    v = np.concatenate([(ta + u * h[:, 0])[:, None], V[0, levels, 1:]], axis=1)
    Fu = (1 - u[:, None, None]) * Fvp[a, levels] + u[:, None, None] * Fvp[a + 1, levels]
    try:
        v = v + np.linalg.solve(Cu, g_at(u)[:, :, None])[:, :, 0]
        tau = np.linalg.solve(Cu, Fu)
    except np.linalg.LinAlgError:
        return None
    good = np.all(np.isfinite(v), axis=1) & np.all(np.isfinite(Cu), axis=(1, 2)) \
        & np.all(np.isfinite(tau), axis=(1, 2))
    if not good.any():
        return None
    return levels[good], v[good], Cu[good], tau[good]


def settled(pt: SharedPoint, gamma_sent: np.ndarray, final_dec: float, final_value: float) -> bool:
    """Whether the value at a final point is that at the joint mode to the last digits: v's Newton decrement
    below final_dec, and the error of its term D_v·δv below final_value.  The sites' ∂ log det C/∂v is
    contracted with the prediction Γ̂ sent, not the round's Γ; its error, about the relative error of Γ̂
    times |D_v·δv| (within a factor 3 on the final rounds of benchmarks/stress_shared.py's 60 fits), put the
    estimate's logLik up to 2e-8 below the pooled one at a decrement of 1.4e-10 (D_v·δv = 1.2e-5, Γ̂ off
    by 3.4e-3).  Such a point takes one more final round, at the same φ with the exact Γ as Γ̂."""
    if pt.decrement >= final_dec:
        return False
    return _gamma_off(pt, gamma_sent) * abs(float(pt.Dv @ pt.dv)) <= final_value


def gradient_settled(pt: SharedPoint, taubar: np.ndarray, gamma_sent: np.ndarray, hess: np.ndarray,
                     final_grad: float) -> bool:
    """Whether the gradient at a final point is exact enough for the last step: the part of it that used Γ̂ --
    ∂ log det C along τ − τ̄ (the differences' exact Γ replaced Γ̂ along τ̄), about e = ε |(τ − τ̄)ᵀ ∂_v log
    det C| with ε Γ̂'s relative error -- moves the last step by ½ H⁻¹e, whose square in H's norm is to be
    below final_grad (tol², as the Newton iteration's last step: ``likelihood.newton_end``).
    On stress_shared.py's fit 34 (iterative) a final point with Γ̂ off by 1.2e-3 had e = (1.5e-6, 1.3e-7,
    1.1e-5) by this, its gradient (1.0e-6, 4e-8, 9.2e-6) by a settled evaluation there, and the fit ended
    4e-7 from the pooled one; it now takes one more final round (Γ̂ then the round's Γ)."""
    if pt.ldc_v is None or not np.all(np.isfinite(hess)):
        return True
    e = _gamma_off(pt, gamma_sent) * np.abs((pt.tau - taubar).T @ pt.ldc_v)
    try:
        return 0.25 * float(e @ np.linalg.lstsq(-hess, e, rcond=None)[0]) <= final_grad
    except (np.linalg.LinAlgError, ValueError):
        return True


def _gamma_off(pt: SharedPoint, gamma_sent: np.ndarray) -> float:
    """The relative error of the prediction Γ̂ sent for a point, against its Γ (largest entries)."""
    scale = float(np.abs(pt.Gamma).max(initial=0.0))
    return float(np.abs(pt.Gamma - gamma_sent).max(initial=0.0)) / scale if scale > 0 else 0.0


def differences(others: list, h: np.ndarray) -> tuple[list, list]:
    """∂C and ∂D_v along each (τ̄_j, e_j), from a round's central difference points x ± h_j (τ̄_j, e_j)
    (``others[2j]``, ``others[2j + 1]``)."""
    dC = [(others[2 * j].C - others[2 * j + 1].C) / (2.0 * hj) for j, hj in enumerate(h)]
    dDv = [(others[2 * j].Dv - others[2 * j + 1].Dv) / (2.0 * hj) for j, hj in enumerate(h)]
    return dC, dDv


def log_det_to_mode(base: SharedPoint, diffs: tuple[list, list]) -> np.ndarray:
    """The change of D's derivative along the tangent, G_j = D_φj + D_v·τ_j, from the point x = (v, φ) to
    v's mode x̂ = x + (δv, 0), to first order in δv, from the round's difference points x ± h_j T̄_j (their
    ``diffs``: :func:`differences`; T̄_j = (τ̄_j, e_j), standing in for T_j = (τ_j, e_j)); the same moves any
    point of the round to its own v's mode (``shared_third``).

    Two terms.  D's own: ∂_δ(D_φj + D_v·τ_j) at fixed τ_j equals (∂_T D_v)·δv (mixed partials
    commute).  The tangent's: at x̂ the tangent solves F_vv τ + F_vφj = 0; differentiated along δ, with
    ∂_δ∂_T F_v = ∂_T(F_vv δv) = −(∂_T C)δv, its change is Δτ_j = −C⁻¹(∂_T C)δv, and G_j moves by
    D_v·Δτ_j.  Without them the gradient is off by O(δv): on a crossed poisson model (sim_items_pois) by
    5.8e-6 at a final decrement of 1e-11, which moved θ̂ by 1e-7 against the pooled fit."""
    return along_tangents(base, diffs, base.dv)


def along_tangents(pt: SharedPoint, diffs: tuple[list, list], w: np.ndarray) -> np.ndarray:
    """∂_w(D_φj + D_v·τ_j) for each j at ``pt``, w a move of v (a vector, or a matrix of moves as columns):
    (∂_{T_j} D_v)·w − D_v·C⁻¹(∂_{T_j} C) w, the two terms of :func:`log_det_to_mode` (which takes w = δv)."""
    dC, dDv = diffs
    return np.stack([dDv[j] @ w - pt.Dv @ (pt.Cinv @ (dC[j] @ w)) for j in range(len(dC))])
