"""Starts from the sites' own fits with several grouping factors (and a gaussian model's with one).

Each factor's covariance is averaged over the sites' fits by their numbers of its levels, the fixed effects
combined by their marginal information (:func:`factor_combined_start`); a gaussian model with one grouping
factor averages its covariance the same way (:func:`gaussian_own_start`).  A factor of which each site holds
one level gets its variance between sites (:mod:`fedglmm.coordinator.between`).

The fits of the full model are also combined by their information (:func:`factor_log_start`).

A site that holds several levels of every factor fits its rows with the full model
(:func:`fedglmm.site.own_fit.own_factor_fit`) and sends β̂, θ̂ (and ψ̂) with their information I_s.  On the
internal scale x = (γ, θ̃, ψ) = T(β, θ, ψ) its log-likelihood is about −½ (x − x̂_s)ᵀ K_s (x − x̂_s), with
K_s = T⁻ᵀ I_s T⁻¹, and the pooled one about their sum, whose maximiser is the information-weighted mean of
the fits.  As with one grouping factor (:func:`fedglmm.coordinator.starts.combined_start`), the standard
deviations (the diagonal of each Λ̃) are combined on the log scale, where a site's likelihood is closer to
quadratic: a site with few levels has its SD's likelihood skewed, and weighted by its information alone it
pulls the mean towards zero.  This start is tried beside the one of
:func:`factor_combined_start`, in the same first Newton round.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..likelihood.linalg import transform_third
from ..model.spec import diagonal_positions, lambda_matrix, theta_index
from .between import between_sites
from .starts import OwnPart, cubic_combination, log_combination

MIN_LEVELS = 5        # a site's own fixed effects (and intercept, between sites) count from this many levels
# ... and a gaussian site's estimate of a factor's covariance from this many, weighted by them (5 before: on 60
# gaussian splits of parity_multilevel and the golden file, 2 took penicillin over 3 sites from 6 and 7 rounds to
# 5 and 5, pastes by REML 6 -> 5 (3 forms), sim_gauss_singular 5 -> 4 (2), none more). GLMMs keep MIN_LEVELS
# (with 2, arabidopsis_la split by population 8 -> 9), as does one grouping factor (gaussian_own_start)
COV_LEVELS = 2
MIN_SHARE = 0.9       # the sites' own fits alone start the Newton rounds when they cover this share of rows


def factor_fits(st, own: dict) -> dict:
    """The sites' own fits (several grouping factors) that a start uses: a fit that left out a factor the site
    holds one level of (``alone``) only where that factor's variance comes from such fits
    (:func:`~fedglmm.coordinator.between.between_sites`) -- the other factors' covariances from them beside
    that variance from the site totals took arabidopsis_olre split by population from 8 to 10 rounds.  A
    gaussian model's (they send σ̂) are kept, for the other factors' covariances, but where levels are shared
    by sites."""
    alone = [o for o in own.values() if o.get("alone")]
    if alone and all("sigma" in o for o in alone):
        # a gaussian model's: its other factors' covariances, unless levels are shared by sites (with them
        # scotssec by ML split by secondary school took 10 rounds instead of 6)
        return {sid: o for sid, o in own.items() if not (st.shared and o.get("alone"))}
    if not alone or between_sites(st, list(own.values()), MIN_LEVELS):
        return own
    return {sid: o for sid, o in own.items() if not o.get("alone")}


def factor_combined_start(st, own: list, fallback, between_sites_ok: bool = True):
    """With several grouping factors, a start from the sites' own fits (internal scale): each factor's
    covariance the mean of the sites' estimates weighted by their numbers of its levels (sites with at
    least ``COV_LEVELS`` of them, gaussian, or ``MIN_LEVELS``; else ``fallback``'s, the site-totals start),
    the fixed effects combined with weights their information from the fits with ``MIN_LEVELS`` levels of
    every factor (else ``fallback``'s), as is a dispersion ψ (θ̃'s last entries).  ``fallback``: (γ, θ̃), or
    θ̃ alone (gaussian).  Returns (the start, whether the sites' fits gave all of it and stand for at least
    ``MIN_SHARE`` of the rows: a start from a part of the data may be further from the pooled fit than the
    site totals).  ``between_sites_ok`` False: no variance between sites (the fallback's instead)."""
    gaussian = not isinstance(fallback, tuple)
    gamma0, theta0 = (None, np.asarray(fallback, float)) if gaussian else fallback
    own = [loc for loc in own if list(loc.get("z_names", [])) == list(st.znames)]       # coded as agreed
    mask = st.mask
    r_idx, c_idx = theta_index(mask)
    k = len(r_idx)
    full, theta0, psi = np.asarray(theta0, float), np.asarray(theta0, float)[:k], np.asarray(theta0, float)[k:]
    q = mask.shape[0]
    lam0 = lambda_matrix(theta0, q, (r_idx, c_idx))
    sig = lam0 @ lam0.T
    complete = True
    between = between_sites(st, own, MIN_LEVELS) if between_sites_ok else {}
    if gaussian and between:            # θ̃ is relative to σ: the variance between sites over the fits' mean σ̂²
        n = np.array([float(loc.get("n", 1.0)) for loc in between["fits"]])
        s2 = float(n @ np.array([float(loc.get("sigma", np.nan)) ** 2 for loc in between["fits"]]) / n.sum())
        between = {g: v / s2 for g, v in between.items() if g not in ("fixed", "fits")} if s2 > 0 else {}
    for g, cols in st.factor_columns().items():
        mean = _mean_covariance(st, [(float(loc.get("levels", {}).get(g, 0)), np.asarray(loc.get("theta", []), float))
                                     for loc in own], full.shape, cols, COV_LEVELS if gaussian else MIN_LEVELS)
        if mean is None and g in between:
            mean = np.array([[between[g]]])
        if mean is not None:
            sig[np.ix_(cols, cols)] = mean
        complete = complete and mean is not None
    try:
        L = np.linalg.cholesky(sig + 1e-12 * np.eye(q))
    except np.linalg.LinAlgError:
        return fallback, False
    theta = L[r_idx, c_idx]
    if gaussian:
        return theta, complete
    # the fixed effects from the fits that saw enough levels of every factor: a site with two or three
    # hospitals estimates their variance poorly, and its information about the intercept with it
    with_beta = [loc for loc in own if loc.get("info") is not None and list(loc.get("names", [])) == list(st.names)
                 and all(float(loc.get("levels", {}).get(g, 0)) >= MIN_LEVELS for g in st.factor_columns())]
    gamma = gamma0
    if with_beta:
        combined = _fixed_combination(st, with_beta)
        if combined is not None:
            gamma, psi = combined
    elif between:
        # every site left out the factor it holds one level of: the fixed effects of those fits combined as
        # in a random-effects meta-analysis, the intercept's variance between sites added to each (a
        # gaussian site sends no such fit: without its information, nothing tells that variance)
        with_beta = between["fits"]
        gamma, psi = between["fixed"]
    covered = sum(float(loc.get("n", 0.0)) for loc in with_beta) >= MIN_SHARE * st.n
    # (a variance from the spread of a few sites' intercepts can be far off: the site-totals start beside)
    return (gamma, np.r_[theta, psi]), complete and bool(with_beta) and covered and not between


def gaussian_own_start(st, own: list) -> np.ndarray | None:
    """θ̃0 for a gaussian model with one grouping factor from the sites' own fits (:func:`own_fit`, sent where
    a site kept small groups' statistics): their relative covariance ΛΛᵀ averaged as
    :func:`factor_combined_start` does per factor (:func:`_mean_covariance`, by numbers of groups).  None
    without such a fit."""
    r_idx, c_idx = theta_index(st.mask)
    q = st.mask.shape[0]
    fits = [(float(loc.get("ngroups", 0)), np.asarray(loc.get("theta", []), float))
            for loc in own if list(loc.get("z_names", [])) == list(st.znames)]
    mean = _mean_covariance(st, fits, (len(r_idx),), np.arange(q))
    if mean is None:
        return None
    try:
        return np.linalg.cholesky(mean + 1e-12 * np.eye(q))[r_idx, c_idx]
    except np.linalg.LinAlgError:
        return None


def _mean_covariance(st, fits: list, shape: tuple, cols, least: int = MIN_LEVELS) -> np.ndarray | None:
    """The covariance of the Z columns ``cols`` (internal scale) averaged over the sites' fits ``fits`` --
    (n, θ̂ on the user's scale, of ``shape``) -- with at least ``least`` levels behind them, weighted by n;
    None without one."""
    r_idx, c_idx = theta_index(st.mask)
    k, q = len(r_idx), st.mask.shape[0]
    acc, wsum = 0.0, 0.0
    for n, th in fits:
        if n >= least and th.shape == shape and np.all(np.isfinite(th)):
            lam = lambda_matrix(th[:k] * st.theta_scale, q, (r_idx, c_idx))[np.ix_(cols, cols)]
            acc, wsum = acc + n * (lam @ lam.T), wsum + n
    return acc / wsum if wsum else None


def internal_fits(st, own: list) -> list:
    """[(fit, K, x)]: the fits ``own`` (as sent) on the internal scale, x = T(β, θ, ψ), K = T⁻ᵀ I T⁻¹ (T: the
    set-up's internal_transform); one not of the model's shape or not finite is left out."""
    nx = len(st.names) + int(st.mask.sum()) + st.ndisp
    T = st.internal_transform()
    Ti = np.linalg.inv(T)
    out = []
    for loc in own:
        try:
            K = Ti.T @ np.asarray(loc["info"], float) @ Ti
            x = T @ np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)]
        except (KeyError, ValueError, TypeError):
            continue
        if K.shape == (nx, nx) and np.all(np.isfinite(K)) and np.all(np.isfinite(x)):
            out.append((loc, K, x))
    return out


def _fixed_combination(st, own: list):
    """The fixed effects γ and the dispersion ψ of fits coded as agreed, combined with weights their marginal
    information (the inverse of their covariance); None if that cannot be done."""
    p, k = len(st.names), int(st.mask.sum())
    fixed = np.r_[np.arange(p), np.arange(p + k, p + k + st.ndisp)]
    Ib, bb = 0.0, 0.0
    for _, H, x in internal_fits(st, own):
        try:
            Ig = np.linalg.inv(np.linalg.inv(H)[np.ix_(fixed, fixed)])
        except np.linalg.LinAlgError:
            continue
        Ib, bb = Ib + Ig, bb + Ig @ x[fixed]
    try:
        y = np.linalg.solve(Ib, bb)
    except (np.linalg.LinAlgError, ValueError):
        return None
    return (y[:p], y[p:]) if np.all(np.isfinite(y)) else None



def factor_log_start(st, own: list) -> list:
    """[(γ, θ̃ and ψ)]: the log-scale information combination of the fits in ``own`` (as sent) that are of the
    full model and coded as agreed (β of the agreed columns, the agreed Z columns, no factor left out), and
    where they all sent third derivatives their combination to third order (:func:`cubic_combination`); or
    [] with fewer than two such fits."""
    p = len(st.names)
    full = [loc for loc in own if not loc.get("alone") and loc.get("info") is not None
            and list(loc.get("names", [])) == list(st.names) and list(loc.get("z_names", [])) == list(st.znames)]
    Ti = np.linalg.inv(st.internal_transform())
    parts = [OwnPart(K, K @ x, x, float(loc.get("n", 0.0)), _third(loc, Ti)) for loc, K, x in internal_fits(st, full)]
    if len(parts) < 2:
        return []
    idx = p + diagonal_positions(st.mask)
    y = cubic_combination(parts, idx, 3.0) if all(o.T is not None for o in parts) else None
    y = log_combination(parts, idx) if y is None else y
    return [] if y is None else [(y[:p], y[p:])]


def _third(loc: dict, Ti: np.ndarray) -> np.ndarray | None:
    """A fit's third derivatives (user's scale, as sent) on the internal scale x = T(β, θ, ψ), or None."""
    D = loc.get("third")
    if D is None or np.shape(D) != (len(Ti),) * 3:
        return None
    D = transform_third(np.asarray(D, float), Ti)
    return D if np.all(np.isfinite(D)) else None


def shared_level_modes(st, own: dict, start) -> tuple | None:
    """The shared levels' modes and conditional SDs (user's scale, a DataFrame of levels × Z columns per
    factor, as :func:`~fedglmm.coordinator.shared_ends.modes_to_v` reads them) combined from the sites' own
    fits' (``modes``: :func:`fedglmm.site.own_fit.own_factor_fit`), for the start ``start`` ((γ, θ̃), or a
    tuple of such, the first used), or None where no site sent any.

    Entry by entry (the SDs alone are sent): a site's mode b with SD c under its own prior variance σ_s²
    (its fit's θ̂) stands for a likelihood of precision p = 1/c² − 1/σ_s² centred at b/(c²p); these add up
    over the sites, and under the start's prior variance σ² the level's mode is Σ(b/c²) / (1/σ² + Σp) and its
    SD (1/σ² + Σp)^(-1/2).  A level no site sent (fewer than ``min_group`` observations at each) keeps its
    prior: mode 0, SD σ.  Only fits coded as agreed (the same Z columns) count."""
    fits = [o for o in own.values() if isinstance(o, dict) and o.get("modes")
            and list(o.get("z_names", [])) == list(st.znames)]
    if not st.shared or not fits or start is None:
        return None
    theta0 = np.asarray((start[0] if isinstance(start[0], tuple) else start)[1], float)
    k, q, idx = int(st.mask.sum()), st.mask.shape[0], theta_index(st.mask)
    lam0 = lambda_matrix(theta0[:k], q, idx) / st.zs[:, None]              # Λ on the user's scale
    prior = np.einsum("ij,ij->i", lam0, lam0)
    modes, sds = {}, {}
    for f, cols in st.factor_columns().items():
        if f not in st.shared:
            continue
        levels = [str(lv) for lv in st.shared[f]]
        at = {lv: i for i, lv in enumerate(levels)}
        num, prec = np.zeros((len(levels), len(cols))), np.zeros((len(levels), len(cols)))
        for o in fits:
            m = o["modes"].get(f)
            if m is None or not len(m["levels"]):
                continue
            lam = lambda_matrix(np.asarray(o["theta"], float)[:k], q, idx)
            own_prior = np.einsum("ij,ij->i", lam, lam)[cols]
            rows = np.array([at.get(str(lv), -1) for lv in m["levels"]])
            b, c = np.asarray(m["modes"], float)[rows >= 0], np.asarray(m["condsd"], float)[rows >= 0]
            ok = (c > 0) & (own_prior > 0)
            c2, s2 = np.where(ok, c, 1.0) ** 2, np.where(ok, own_prior, 1.0)
            np.add.at(num, rows[rows >= 0], np.where(ok, b / c2, 0.0))
            np.add.at(prec, rows[rows >= 0], np.where(ok, np.maximum(1.0 / c2 - 1.0 / s2, 0.0), 0.0))
        with np.errstate(divide="ignore"):
            total = 1.0 / prior[cols] + prec
        if not np.all(np.isfinite(total)):
            return None
        names = [st.znames[c] for c in cols]
        modes[f] = pd.DataFrame(num / total, index=levels, columns=names)
        sds[f] = pd.DataFrame(1.0 / np.sqrt(total), index=levels, columns=names)
    return (modes, sds) if modes else None

