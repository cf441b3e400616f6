"""The hybrid's starting points at the coordinator: an estimate on the internal scale, and the
combination of estimates of disjoint sets of groups (the sites' own fits and the pseudo-data fit)."""
from __future__ import annotations

import numpy as np



def combined_start(st, own: list, x_pseudo=None, pseudo=None):
    """A start from estimates of disjoint sets of groups (internal scale): the sites' own fits and the
    one-shot fit (with the information of the pseudo-data of the other sites).  The fixed effects are
    combined with weights their marginal information (the inverse of their covariance), the covariance
    parameters with weights the numbers of groups behind them (the information about θ changes too
    quickly with θ to weight by it); a dispersion ψ (the last entries) as the fixed effects.  None if that
    cannot be done."""
    p, k = len(st.names), int(st.mask.sum())
    nx = p + k + st.ndisp
    fixed = np.r_[np.arange(p), np.arange(p + k, nx)]
    T = st.internal_transform()
    Ti = np.linalg.inv(T)
    parts = []                                   # (information, (γ, θ̃), number of groups behind them)
    if x_pseudo is not None and pseudo is not None:
        parts.append((pseudo(x_pseudo)[2], x_pseudo, st.ngroups - sum(o.get("ngroups", 0) for o in own)))
    Ib, bb, wt, tt = 0.0, 0.0, 0.0, 0.0
    for loc in own:
        if "xinfo" in loc:              # information sums in the agreed coding (a model with factor columns)
            got = _coded(loc, st, p, k, nx)
            if got is not None:
                Ib, bb = Ib + got[0], bb + got[1]
                wt, tt = wt + max(got[3], 0.0), tt + max(got[3], 0.0) * got[2]
            continue
        try:
            H = Ti.T @ np.asarray(loc["info"], float) @ Ti
            x = T @ np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)]
            parts.append((H, x, float(loc["ngroups"])))
        except (KeyError, ValueError, TypeError):
            continue
    for H, x, ng in parts:
        if H.shape != (nx, nx) or not (np.all(np.isfinite(H)) and np.all(np.isfinite(x))):
            continue
        try:
            Vb = np.linalg.inv(H)[np.ix_(fixed, fixed)]
            Ig = np.linalg.inv(Vb)
        except np.linalg.LinAlgError:
            continue
        Ib, bb = Ib + Ig, bb + Ig @ x[fixed]
        wt, tt = wt + max(ng, 0.0), tt + max(ng, 0.0) * x[p:p + k]
    if wt == 0.0 and k:
        return None
    try:
        gamma = np.linalg.solve(Ib, bb)
    except (np.linalg.LinAlgError, ValueError):
        return None
    theta = np.r_[tt / wt if k else np.zeros(0), gamma[p:]]
    gamma = gamma[:p]
    return (gamma, theta) if np.all(np.isfinite(gamma)) and np.all(np.isfinite(theta)) else None


def _coded(loc: dict, st, p: int, k: int, nx: int):
    """(information, information × estimate) of (γ, ψ), θ̃ and the number of groups of an own fit sent as
    information sums (β = Aγ: Aᵀ I A and Aᵀ I β̂; ψ by its own variance); None if unusable."""
    try:
        A = st.A
        I, b = A.T @ np.asarray(loc["xinfo"], float) @ A, A.T @ np.asarray(loc["xinfo_b"], float)
        theta = np.asarray(loc["theta"], float)
        info, vec = np.zeros((nx - k, nx - k)), np.zeros(nx - k)
        info[:p, :p], vec[:p] = I, b
        if nx > p + k:
            info[p, p] = 1.0 / float(loc["disp_var"])
            vec[p] = theta[k] * info[p, p]
        th = theta[:k] * st.theta_scale
    except (KeyError, ValueError, TypeError, ZeroDivisionError, IndexError):
        return None
    ok = all(np.all(np.isfinite(a)) for a in (info, vec, th)) and theta.shape == (nx - p,)
    return (info, vec, th, float(loc["ngroups"])) if ok else None


MIN_LEVELS = 5        # a site's own estimate of a factor's covariance counts from this many of its levels


def factor_combined_start(st, own: list, fallback):
    """With several grouping factors, a start from the sites' own fits (internal scale): each factor's
    covariance the mean of the sites' estimates weighted by their numbers of its levels (sites with at
    least ``MIN_LEVELS`` of them; else ``fallback``'s, the site-totals start), the fixed effects combined
    with weights their information (else ``fallback``'s), as is a dispersion ψ (θ̃'s last entries).
    ``fallback``: (γ, θ̃), or θ̃ alone (gaussian).  Returns (the start, whether the sites' fits gave all
    of it)."""
    from ..model.spec import lambda_matrix, theta_index

    gaussian = not isinstance(fallback, tuple)
    gamma0, theta0 = (None, np.asarray(fallback, float)) if gaussian else fallback
    own = [loc for loc in own if list(loc.get("z_names", [])) == list(st.znames)]       # coded as agreed
    mask, ts = st.mask, st.theta_scale
    r_idx, c_idx = theta_index(mask)
    k = len(r_idx)
    full, theta0, psi = np.asarray(theta0, float), np.asarray(theta0, float)[:k], np.asarray(theta0, float)[k:]
    q = mask.shape[0]
    lam0 = lambda_matrix(theta0, q, (r_idx, c_idx))
    sig = lam0 @ lam0.T
    complete = True
    for g, cols in st.factor_columns().items():
        acc, wsum = 0.0, 0.0
        for loc in own:
            n = float(loc.get("levels", {}).get(g, 0))
            th = np.asarray(loc.get("theta", []), float)
            if n >= MIN_LEVELS and th.shape == full.shape and np.all(np.isfinite(th)):
                lam = lambda_matrix(th[:k] * ts, q, (r_idx, c_idx))[np.ix_(cols, cols)]
                acc, wsum = acc + n * (lam @ lam.T), wsum + n
        if wsum:
            sig[np.ix_(cols, cols)] = acc / wsum
        complete = complete and wsum > 0
    try:
        L = np.linalg.cholesky(sig + 1e-12 * np.eye(q))
    except np.linalg.LinAlgError:
        return fallback, False
    theta = L[r_idx, c_idx]
    if gaussian:
        return theta, complete
    with_beta = [loc for loc in own if loc.get("info") is not None and list(loc.get("names", [])) == list(st.names)]
    gamma = gamma0
    if with_beta:
        combined = combined_start(st, [dict(loc, ngroups=1.0) for loc in with_beta])
        if combined is not None:
            gamma, psi = combined[0], combined[1][k:]
    return (gamma, np.r_[theta, psi]), complete and bool(with_beta)


def internal_start(fixef, theta, st) -> tuple[np.ndarray, np.ndarray]:
    """A fit's estimates on the iterative method's internal scale (γ = A⁻¹β, θ̃ = diag(zs) θ)."""
    gamma = np.linalg.solve(st.A, fixef.reindex(st.names).to_numpy())
    return gamma, np.asarray(theta, float) * st.theta_scale
