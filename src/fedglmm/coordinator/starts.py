"""The hybrid's starting points at the coordinator: an estimate on the internal scale, and the
combination of estimates of disjoint sets of groups (the sites' own fits and the pseudo-data fit)."""
from __future__ import annotations

import numpy as np



def combined_start(st, own: list, x_pseudo=None, pseudo=None):
    """A start from estimates of disjoint sets of groups (internal scale): the sites' own fits and the
    one-shot fit (with the information of the pseudo-data of the other sites).  The fixed effects are
    combined with weights their marginal information (the inverse of their covariance), the covariance
    parameters with weights the numbers of groups behind them (the information about θ changes too
    quickly with θ to weight by it).  None if that cannot be done."""
    p, nx = len(st.names), len(st.names) + int(st.mask.sum())
    T = st.internal_transform()
    Ti = np.linalg.inv(T)
    parts = []                                   # (information, (γ, θ̃), number of groups behind them)
    if x_pseudo is not None and pseudo is not None:
        parts.append((pseudo(x_pseudo)[2], x_pseudo, st.ngroups - sum(o.get("ngroups", 0) for o in own)))
    for loc in own:
        try:
            H = Ti.T @ np.asarray(loc["info"], float) @ Ti
            x = T @ np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)]
            parts.append((H, x, float(loc["ngroups"])))
        except (KeyError, ValueError, TypeError):
            continue
    Ib, bb, wt, tt = 0.0, 0.0, 0.0, 0.0
    for H, x, ng in parts:
        if H.shape != (nx, nx) or not (np.all(np.isfinite(H)) and np.all(np.isfinite(x))):
            continue
        try:
            Vb = np.linalg.inv(H)[:p, :p]
            Ig = np.linalg.inv(Vb)
        except np.linalg.LinAlgError:
            continue
        Ib, bb = Ib + Ig, bb + Ig @ x[:p]
        wt, tt = wt + max(ng, 0.0), tt + max(ng, 0.0) * x[p:]
    if wt == 0.0 and nx > p:
        return None
    try:
        gamma = np.linalg.solve(Ib, bb)
    except (np.linalg.LinAlgError, ValueError):
        return None
    theta = tt / wt if nx > p else np.zeros(0)
    return (gamma, theta) if np.all(np.isfinite(gamma)) and np.all(np.isfinite(theta)) else None


def internal_start(fixef, theta, st) -> tuple[np.ndarray, np.ndarray]:
    """A fit's estimates on the iterative method's internal scale (γ = A⁻¹β, θ̃ = diag(zs) θ)."""
    gamma = np.linalg.solve(st.A, fixef.reindex(st.names).to_numpy())
    return gamma, np.asarray(theta, float) * st.theta_scale
