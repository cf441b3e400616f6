"""A grouping factor of which each site holds one level (each hospital a site): its variance and the fixed
effects from the sites' own fits of the model without it.

Such a site cannot estimate the factor's variance; it fits its rows without the factor's terms
(:func:`fedglmm.site.own_fit.own_factor_fit`), so its level's effect sits in its intercept.  Across sites
those intercepts then differ by the factor's effects plus their own estimation error: the situation of a
random-effects meta-analysis, whose moment estimator of the between-study variance (DerSimonian & Laird
1986, Controlled Clinical Trials 7:177) gives the factor's variance here, and whose weighted mean gives
the fixed effects.

A covariate of the factor's level (a hospital's own, constant at its site) is not in a site's fit: the site
leaves out the columns its others determine there (:func:`fedglmm.site.own_fit.short_fit`), and their effects
are in the ones kept -- a constant's in the intercept.  The coordinator maps the agreed fixed effects γ to
each fit's coefficients, b = L γ, through the site's cross-products XᵀX (as
:func:`fedglmm.coordinator.starts.own_part` does), so that the intercepts differ by the covariates' effects:
the variance comes from the meta-regression of the intercepts on those rows of L (the moment estimator of
the residual heterogeneity, which is DerSimonian and Laird's where every fit has every column), and γ from
all the fits' coefficients by generalised least squares.
"""
from __future__ import annotations

import numpy as np

from ..model.spec import theta_index
from .starts import agreed_map


def between_sites(st, own: list, min_sites: int) -> dict:
    """Where the sites' own fits left out one factor, the same at each (``alone``: the site holds one of
    its levels), and its terms are a random intercept: its variance on the internal scale and the fixed
    effects (with ψ), {factor: τ̂², "fixed": (γ, ψ), "fits": the fits used}.  Each fit k gives coefficients
    b_k (with ψ) of mean M_k γ and covariance V_k + τ² e_k e_kᵀ (e_k: its intercept; M_k: the identity where
    the fit has the agreed columns, else :func:`~fedglmm.coordinator.starts.agreed_map`);
    its intercept at the centre of its rows a_k = c_kᵀ b_k (see :func:`_fit`; c_k's intercept entry 1) has mean
    h_kᵀ γ, h_k = M_kᵀ c_k, and variance v_k + τ².  The moment
    estimator τ̂² = max(0, (Q − (K − m)) / tr P), P = W − W H (HᵀWH)⁺ HᵀW, W = diag(1/v_k), Q = aᵀ P a, m the
    rank of H (with one column layout it is DerSimonian & Laird's, m = 1: τ̂² = (Q − (K − 1)) / (Σw −
    Σw²/Σw)), and γ = (Σ M_kᵀ W_k M_k)⁻¹ Σ M_kᵀ W_k b_k, W_k = (V_k + τ̂² e_k e_kᵀ)⁻¹.  Empty with fewer
    than ``min_sites`` such fits that map to the agreed coding with a positive definite covariance of their
    fixed effects, a fit of another kind among them, no intercept, or fixed effects the fits do not
    determine."""
    alone = [loc for loc in own if loc.get("alone")]
    factors = {tuple(loc["alone"]) for loc in alone}
    if len(alone) < min_sites or len(factors) != 1 or len(alone) < len(own) or "Intercept" not in st.names:
        return {}
    (left,) = factors
    columns = st.factor_columns() or {left[0]: np.arange(st.mask.shape[0])}      # (one factor: its Z column)
    cols = columns.get(left[0]) if len(left) == 1 else None
    if cols is None or len(cols) != 1:
        return {}
    p, nd = len(st.names), st.ndisp
    T = st.internal_transform()                     # (γ, ψ) = T (β, ψ) on its fixed-effect and ψ entries
    sel = np.r_[np.arange(p), np.arange(T.shape[0] - nd, T.shape[0])]
    fits = [f for f in (_fit(st, loc, T[np.ix_(sel, sel)]) for loc in alone) if f is not None]
    if len(fits) < min_sites:
        return {}
    tau2 = _tau2(fits)
    try:
        A, rhs = 0.0, 0.0
        for b, V, M, e, _, _ in fits:
            W = np.linalg.inv(V + tau2 * np.outer(e, e))
            A, rhs = A + M.T @ W @ M, rhs + M.T @ W @ b
        y = np.linalg.solve(A, rhs)
    except (np.linalg.LinAlgError, ValueError):
        return {}
    if not np.all(np.isfinite(y)) or np.linalg.cond(A) > 1e12:
        return {}
    r_idx, c_idx = theta_index(st.mask)
    j = int(np.flatnonzero((r_idx == cols[0]) & (c_idx == cols[0]))[0])
    return {left[0]: tau2 * float(st.theta_scale[j]) ** 2, "fixed": (y[:p], y[p:]), "fits": [f[5] for f in fits]}


def _fit(st, loc: dict, T: np.ndarray):
    """(b, V, M, e, c, loc) of one site's fit: its coefficients (then ψ) and their covariance, the map M from
    the agreed (γ, ψ), its intercept's unit vector e, and c with cᵀb its intercept at the centre of its rows --
    on the internal scale where the fit has the agreed columns (b = T(β, ψ), whose intercept is centred
    already: c = e), else on the fit's own, c its columns' means there (an intercept at x = 0 far from the
    rows, a year coded 95-97 say, is known to ±100 and moves with the slopes); None where that cannot be
    had.  ``T``: the internal transform of (β, ψ)."""
    p, nd = len(st.names), st.ndisp
    try:
        names = list(loc["names"])
        info = np.asarray(loc["info"], float)
        ps = len(names)
        if info.ndim != 2 or info.shape[0] < ps + nd or "Intercept" not in names:
            return None
        fixed = np.r_[np.arange(ps), np.arange(info.shape[0] - nd, info.shape[0])]
        C = np.linalg.inv(info)[np.ix_(fixed, fixed)]
        b = np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)[len(loc["theta"]) - nd:]]
        e = np.zeros(ps + nd)
        if names == list(st.names):
            b, V, M = T @ b, T @ C @ T.T, np.eye(p + nd)
            e[st.names.index("Intercept")] = 1.0
            c = e
        else:
            M = np.zeros((ps + nd, p + nd))
            # the site's one-shot design and XᵀX, added by the coordinator to the fit (methods.hybrid)
            site_names, xtx = list(loc["site_x"][0]), np.asarray(loc["site_x"][1], float)
            M[:ps, :p] = agreed_map(st, site_names, xtx, names)
            M[ps:, p:] = np.eye(nd)
            V = C
            e[names.index("Intercept")] = 1.0
            i = site_names.index("Intercept")
            c = np.r_[xtx[i, [site_names.index(nm) for nm in names]] / xtx[i, i], np.zeros(nd)]
        np.linalg.cholesky(V)
    except (KeyError, ValueError, TypeError, IndexError, np.linalg.LinAlgError):
        return None
    ok = all(np.all(np.isfinite(a)) for a in (b, V, M))
    return (b, V, M, e, c, loc) if ok else None


def _tau2(fits: list) -> float:
    """The moment estimate of the variance between the fits' intercepts beyond their standard errors and
    what the covariates in their rows of M explain (see :func:`between_sites`)."""
    a = np.array([c @ b for b, _, _, _, c, _ in fits])
    w = np.array([1.0 / float(c @ V @ c) for _, V, _, _, c, _ in fits])
    Hm = np.array([M.T @ c for _, _, M, _, c, _ in fits])
    HW = Hm.T * w
    HWH = HW @ Hm
    m = int(np.linalg.matrix_rank(HWH))
    P = np.diag(w) - HW.T @ np.linalg.pinv(HWH) @ HW
    q, tr = float(a @ P @ a), float(np.trace(P))
    return max(0.0, (q - (len(a) - m)) / tr) if tr > 0 else 0.0


def one_level_fits(own: dict, replies: dict, st) -> tuple[list, dict]:
    """(the fits of sites that hold one level of a model's one grouping factor and left it out, as
    :func:`one_level_start` reads them -- with the site's one-shot column names and XᵀX, through which a fit
    without a column constant at its site maps to the agreed coding --, the other fits).  None of them under
    secure aggregation (no XᵀX) or with several grouping factors (their own path)."""
    if st is None or st.factor_groups:
        return [], own
    alone = [dict(o, site_x=(replies[sid]["x_names"], replies[sid]["sums"]["xtx"])) for sid, o in own.items()
             if o.get("alone") and "xtx" in replies[sid].get("sums", {})]
    return alone, {sid: o for sid, o in own.items() if not o.get("alone")}


def one_level_start(st, alone: list, min_sites: int) -> tuple | None:
    """(γ, θ̃ with ψ) for a model of one grouping factor, a random intercept, from the fits of sites that hold
    one level each (``alone``: each hospital a site), as :func:`between_sites` gives them: the fixed effects
    of the random-effects meta-analysis and the intercepts' variance between the sites; None with fewer than
    ``min_sites`` such fits or where that cannot be had."""
    if st.factor_groups or st.mask.shape != (1, 1) or len(alone) < min_sites:
        return None
    out = between_sites(st, alone, min_sites)
    if not out:
        return None
    (g,) = [k for k in out if k not in ("fixed", "fits")]
    gamma, psi = out["fixed"]
    return np.asarray(gamma, float), np.r_[np.sqrt(out[g]), np.asarray(psi, float)]
