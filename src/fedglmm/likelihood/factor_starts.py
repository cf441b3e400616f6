"""Starting values with several grouping factors: a joint method-of-moments estimate of every factor's
covariance from the sites' totals.

With one factor (:func:`fedglmm.likelihood.starts.moment_start`) the working residuals' group sums
r_g = Σ_{j∈g} w_j z_j ζ_j satisfy E[Σ_g r_g r_gᵀ] ≈ Σ_g W_g Σ W_g + Σ_g W_g.  With several factors the group
sums of factor f also carry the effects of every other factor h, through the cross-products of each pair
of levels that share rows, C_{gℓ} = Σ_{j ∈ g∩ℓ} w_j z_{f,j} z_{h,j}ᵀ:

    E[Σ_g r_g r_gᵀ] ≈ Σ_h Σ_{(g,ℓ)} C_{gℓ} Σ_h C_{gℓ}ᵀ + σ² Σ_g W_g,

linear in all the Σ_h at once (σ² = 1 for binomial and poisson working residuals; for gaussian models σ²
is one more unknown, with the equation of the residual sum of squares Σ_j r_j² ≈ Σ_h tr(Σ_h Z_hᵀZ_h) +
(n − p)σ²).  The sites send Σ_{(g,ℓ)} C_{gℓ} ⊗ C_{gℓ} for every pair of factors (totals over pairs of
levels: nothing per group), and the coordinator solves the equations for every allowed entry of every Σ_h
together -- so the variance of a hospital is not counted again in its patients (Searle, Casella &
McCulloch 1992, Variance Components, ch. 5, on such quadratic-form estimators).  Each Σ_h then becomes θ as
with one factor (standard deviations floored, correlations clipped).
"""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from .moment_estimates import binomial_moments, conditional, moment_sigma, null_step, sigma_theta
from .setup import Setup
from .start_sums import MOMENT_KEYS, from_null_model

FLOOR = 0.25            # smallest standard deviation of a start (internal scale)


# --- at the coordinator -------------------------------------------------------------------------------

def factor_start(st: Setup, family: Family, psi0: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(γ0, θ̃0) for models with several grouping factors; with a dispersion parameter (its start ``psi0``)
    θ̃0 ends with it, and the working residuals' own variance is that of the family at ψ0."""
    s, A, n = st.sums, st.A, st.n
    cols = st.factor_columns()
    phi = 1.0 if psi0 is None else float(np.exp(-psi0))
    eta = []
    if from_null_model(family):
        gamma, (omega, alpha, delta) = null_step(s, family, A, eta)
        moments = [binomial_moments(s, omega, alpha, delta, suffix=f".{i}") for i in range(len(cols))]
        cross = {key: omega ** 2 * v for key, v in _cross(s, "st_ww").items()}
        noise = [phi * m["mom_w"] for m in moments]
    else:
        gamma = np.linalg.solve(A.T @ s["xtwx"] @ A, A.T @ s["xtwz"])
        moments = [{k: s[f"{k}.{i}"] for k in MOMENT_KEYS} for i in range(len(cols))]
        cross = _cross(s, "mom_ww")
        noise = [m["mom_w"] + phi * s[f"mom_w2.{i}"] if family.name == "negative_binomial" else phi * m["mom_w"]
                 for i, m in enumerate(moments)]
    sigmas, _ = joint_sigmas(st, moments, cross, A @ gamma, noise=None if psi0 is None else noise)
    floor = FLOOR if family.name != "gamma" or family.link == "log" else 0.2 * FLOOR * abs(eta[0])   # η on y's scale
    theta, s2 = [], 0.0
    for (g, c), sig in zip(cols.items(), sigmas):
        th, cov = sigma_theta(sig, st.mask[np.ix_(c, c)], st.zs[c], floor)
        theta.append(th)
        s2 += float(np.trace(cov @ s["ztz"][np.ix_(c, c)]) / n)
    disp = [] if psi0 is None else [psi0]
    if from_null_model(family):
        return conditional(gamma, family, s2), np.concatenate(theta + [disp])
    if "Intercept" in st.names and family.name != "gamma":
        gamma[st.names.index("Intercept")] -= s2
    return gamma, np.concatenate(theta + [disp])


def factor_theta_start(st: Setup) -> np.ndarray:
    """θ̃0 (relative to σ) for a gaussian model with several grouping factors."""
    s = st.sums
    cols = st.factor_columns()
    beta = np.linalg.lstsq(s["xtx"], s["xty"], rcond=None)[0]
    rss = max(float(s["yty"] - 2.0 * beta @ s["xty"] + beta @ s["xtx"] @ beta), 1e-300)
    moments = [{k: s[f"{k}.{i}"] for k in MOMENT_KEYS} for i in range(len(cols))]
    sigmas, sigma2 = joint_sigmas(st, moments, _cross(s, "mom_ww"), beta, rss=rss)
    sigma2 = max(sigma2, 0.1 * rss / st.n)
    return np.concatenate([sigma_theta(sig / sigma2, st.mask[np.ix_(c, c)], st.zs[c], FLOOR)[0]
                           for c, sig in zip(cols.values(), sigmas)])


def _cross(s: dict, key: str) -> dict:
    """{(i, k): Σ C ⊗ C} for both orders of every pair of factors (from the sums of i < k)."""
    out = {}
    for name, v in s.items():
        parts = name.split(".")
        if parts[0] == key and len(parts) == 3:
            i, k = int(parts[1]), int(parts[2])
            out[i, k] = np.asarray(v)
            out[k, i] = np.asarray(v).transpose(1, 0, 3, 2)
    return out


def joint_sigmas(st: Setup, moments: list, cross: dict, beta: np.ndarray, rss: float | None = None, noise=None):
    """Every factor's Σ (data scale) from the joint moment equations (see the module docstring), and σ²
    (gaussian: ``rss`` given; else 1, or the working residuals' own covariance per factor in ``noise``).
    Falls back to each factor's own estimate if the system is singular."""
    cols = list(st.factor_columns().values())
    masks = [st.mask[np.ix_(c, c)] for c in cols]
    allowed = [(m.astype(float) @ m.T.astype(float)) > 0 for m in masks]
    basis = [[(a, b) for a in range(len(c)) for b in range(a + 1) if al[a, b]] for c, al in zip(cols, allowed)]
    offsets = np.cumsum([0] + [len(b) for b in basis])
    gaussian = rss is not None
    nunk = offsets[-1] + int(gaussian)
    rows, rhs = [], []
    for f, mom in enumerate(moments):
        stb = mom["mom_st"] @ beta
        R = mom["mom_ss"] - stb - stb.T + np.einsum("akbl,k,l->ab", mom["mom_tt"], beta, beta)
        for a, d in basis[f]:
            row = np.zeros(nunk)
            for h in range(len(cols)):
                T = mom["mom_ww"] if h == f else cross[f, h]
                for j, (b, c) in enumerate(basis[h]):
                    row[offsets[h] + j] = T[a, b, c, d] + (T[a, c, b, d] if b != c else 0.0)
            if gaussian:
                row[-1] = mom["mom_w"][a, d]
            rows.append(row)
            rhs.append(R[a, d] - (0.0 if gaussian else (mom["mom_w"] if noise is None else noise[f])[a, d]))
    if gaussian:
        row = np.zeros(nunk)
        for h, c in enumerate(cols):
            ztz = st.sums["ztz"][np.ix_(c, c)]
            for j, (b, cc) in enumerate(basis[h]):
                row[offsets[h] + j] = ztz[cc, b] + (ztz[b, cc] if b != cc else 0.0)
        row[-1] = st.n - len(beta)
        rows.append(row)
        rhs.append(rss)
    M, r = np.asarray(rows), np.asarray(rhs)
    sol = np.linalg.lstsq(M, r, rcond=None)[0] if np.all(np.isfinite(M)) and np.all(np.isfinite(r)) else None
    if sol is None or not np.all(np.isfinite(sol)):
        return [moment_sigma(m, beta, mk, None if noise is None else nz)
                for m, mk, nz in zip(moments, masks, noise or [None] * len(moments))], 1.0
    sigmas = []
    for f, c in enumerate(cols):
        S = np.zeros((len(c), len(c)))
        for j, (a, b) in enumerate(basis[f]):
            S[a, b] = S[b, a] = sol[offsets[f] + j]
        sigmas.append(S)
    return sigmas, (float(sol[-1]) if gaussian else 1.0)
