"""A grouping factor of which each site holds one level (each hospital a site): its variance and the fixed
effects from the sites' own fits of the model without it.

Such a site cannot estimate the factor's variance; it fits its rows without the factor's terms
(:func:`fedglmm.site.own_fit.own_factor_fit`), so its level's effect sits in its intercept.  Across sites
those intercepts then differ by the factor's effects plus their own estimation error: the situation of a
random-effects meta-analysis, whose moment estimator of the between-study variance (DerSimonian & Laird
1986, Controlled Clinical Trials 7:177) gives the factor's variance here, and whose weighted mean gives
the fixed effects.
"""
from __future__ import annotations

import numpy as np

from ..model.spec import theta_index


def between_sites(st, own: list, min_sites: int) -> dict:
    """Where the sites' own fits left out one factor, the same at each (``alone``: the site holds one of
    its levels), and its terms are a random intercept: its variance on the internal scale, from how the
    fits' intercepts γ̂₀ differ beyond their standard errors (DerSimonian & Laird 1986:
    τ̂² = max(0, (Q − (K − 1)) / (Σw − Σw²/Σw)), w = 1/v the inverse variances, Q = Σ w (γ̂₀ − γ̄)², over the
    K fits), and the fixed effects (with ψ) combined with weights (V + τ̂² e₀e₀ᵀ)⁻¹, V each fit's covariance
    of them: {factor: τ̂², "fixed": (γ, ψ), "fits": the fits used}.  Empty with fewer than ``min_sites``
    such fits coded as agreed and with a positive definite covariance of the fixed effects, a fit of
    another kind among them, or no intercept."""
    alone = [loc for loc in own if loc.get("alone")]
    factors = {tuple(loc["alone"]) for loc in alone}
    if len(alone) < min_sites or len(factors) != 1 or len(alone) < len(own) or "Intercept" not in st.names:
        return {}
    (left,) = factors
    cols = st.factor_columns().get(left[0]) if len(left) == 1 else None
    if cols is None or len(cols) != 1:
        return {}
    g = left[0]
    p, nd = len(st.names), st.ndisp
    T = st.internal_transform()                     # (γ, ψ) = T (β, ψ) on its fixed-effect and ψ entries
    sel = np.r_[np.arange(p), np.arange(T.shape[0] - nd, T.shape[0])]
    T = T[np.ix_(sel, sel)]
    xs, Vs, used = [], [], []
    for loc in alone:               # (a fit coded otherwise, or whose information is not positive definite in
        try:                        # the fixed effects, e.g. a short fit stopped where it is not, is passed over)
            info = np.asarray(loc["info"], float)
            if list(loc.get("names", [])) != list(st.names) or info.ndim != 2 or info.shape[0] < p + nd:
                continue
            fixed = np.r_[np.arange(p), np.arange(info.shape[0] - nd, info.shape[0])]
            C = np.linalg.inv(info)[np.ix_(fixed, fixed)]
            x = T @ np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)[len(loc["theta"]) - nd:]]
            V = T @ C @ T.T
            np.linalg.cholesky(V)
        except (KeyError, ValueError, TypeError, np.linalg.LinAlgError):
            continue
        if np.all(np.isfinite(x)) and np.all(np.isfinite(V)):
            xs.append(x)
            Vs.append(V)
            used.append(loc)
    if len(used) < min_sites:
        return {}
    i0 = st.names.index("Intercept")
    a, w = np.array([x[i0] for x in xs]), np.array([1.0 / V[i0, i0] for V in Vs])
    abar = float(w @ a / w.sum())
    q = float(w @ (a - abar) ** 2)
    tau2 = max(0.0, (q - (len(a) - 1)) / (w.sum() - (w @ w) / w.sum()))
    e0 = np.zeros(p + nd)
    e0[i0] = 1.0
    try:
        W = [np.linalg.inv(V + tau2 * np.outer(e0, e0)) for V in Vs]
        y = np.linalg.solve(sum(W), sum(Wk @ x for Wk, x in zip(W, xs)))
    except np.linalg.LinAlgError:
        return {}
    if not np.all(np.isfinite(y)):
        return {}
    r_idx, c_idx = theta_index(st.mask)
    j = int(np.flatnonzero((r_idx == cols[0]) & (c_idx == cols[0]))[0])
    return {g: tau2 * float(st.theta_scale[j]) ** 2, "fixed": (y[:p], y[p:]), "fits": used}
