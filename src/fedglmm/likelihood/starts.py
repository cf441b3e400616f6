"""Starting values from the set-up sums: one IRLS step from a null model and a moment estimate of the
random-effect covariance (binomial), or from μ = y + ½ (poisson); all on the internal scale."""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from ..model.spec import theta_index
from .setup import Setup


def start_values(st: Setup, family: Family) -> tuple[np.ndarray, np.ndarray]:
    """(γ0, θ̃0) on the internal scale from the set-up sums (binomial and poisson)."""
    s, A, mask, zs, n = st.sums, st.A, st.mask, st.zs, st.n
    q = mask.shape[0]
    if family.name == "binomial":
        return null_step_start(s, family, A, mask, zs, s["ztz"] / n)
    gamma0 = np.linalg.solve(A.T @ s["xtwx"] @ A, A.T @ s["xtwz"])
    theta0 = np.zeros(0)
    if q:
        theta0, sig0 = moment_start(s, A @ gamma0, mask, zs)
        if "Intercept" in st.names:
            # the IRLS weights grow like e^b, so the weighted start overstates the intercept by ≈ E[zᵀΣz]
            gamma0[st.names.index("Intercept")] -= np.trace(sig0 @ s["ztz"]) / n
    return gamma0, theta0


def null_step_start(s: dict, family: Family, A: np.ndarray, mask: np.ndarray, zscale: np.ndarray,
                    zz: np.ndarray):
    """Binomial starting values: one IRLS step from the intercept-only model, a moment estimate of Σ, and
    the marginal-to-conditional correction of the coefficients.

    c = link(Σy / Σm) gives μ(c), κ = μ'(c) and V = μ(1 − μ); then XᵀWX = ω XᵀMX and
    XᵀWz = α Xᵀy + δ Xᵀm with ω = κ²/V, α = κ/V, δ = (κ²c − κμ(c))/V (see :func:`fedglmm.likelihood.setup.start_sums`).
    The step estimates marginal (population-averaged) coefficients; with the first estimate of Σ and
    s² = E[zᵀΣz] they become conditional ones: logit β·√(1 + 0.346 s²) (Zeger, Liang & Albert 1988,
    Biometrics 44, eq. 2.3), probit β·√(1 + s²) (exact); cloglog is left as it is.
    """
    mean = min(max(s["st_sy"] / s["st_sv"], 1e-6), 1.0 - 1e-6)
    c = float(family.linkfun(mean))
    mu = float(family.mean(c))
    h = 1e-6
    kappa = float((family.mean(c + h) - family.mean(c - h)) / (2.0 * h))
    var = mu * (1.0 - mu)
    omega, alpha, delta = kappa**2 / var, kappa / var, (kappa**2 * c - kappa * mu) / var
    gamma = np.linalg.solve(A.T @ (omega * s["st_xvx"]) @ A, A.T @ (alpha * s["st_xy"] + delta * s["st_xv"]))
    if not mask.size:
        return gamma, np.zeros(0)
    mom = {"mom_ss": alpha**2 * s["st_aa"] + alpha * delta * (s["st_ab"] + s["st_ab"].T) + delta**2 * s["st_bb"],
           "mom_st": omega * (alpha * s["st_at"] + delta * s["st_bt"]), "mom_tt": omega**2 * s["st_tt"],
           "mom_ww": omega**2 * s["st_ww"], "mom_w": omega * s["st_w"]}
    theta, sig = moment_start(mom, A @ gamma, mask, zscale)
    s2 = float(np.trace(sig @ zz))
    if family.link == "logit":
        gamma = gamma * np.sqrt(1.0 + 0.346 * s2)
    elif family.link == "probit":
        gamma = gamma * np.sqrt(1.0 + s2)
    return gamma, theta


def moment_start(m: dict, beta: np.ndarray, mask: np.ndarray, zscale: np.ndarray, floor: float = 0.5):
    """θ̃ (on the internal Z scale) from the working residuals' group moments, and the raw Σ it implies.

    Σ_g r_g r_gᵀ ≈ Σ_g W_g Σ W_g + Σ_g W_g with r_g = s_g − T_g β, s_g = Σ_j w_j z_j ζ_j, T_g = Σ_j w_j ζ_j x_jᵀ
    and W_g = Σ_j w_j ζ_j ζ_jᵀ over a group's rows: the left side is a quadratic in β whose coefficients
    are sums over groups.  The linear system in Σ is solved by least squares and restricted to the model's
    pattern; on the internal scale each standard deviation is at least ``floor`` (θ = 0 is a saddle of
    the symmetric objective, and a start near it wastes rounds) and correlations are kept within ±0.9.
    """
    q = mask.shape[0]
    stb = m["mom_st"] @ beta
    R = m["mom_ss"] - stb - stb.T + np.einsum("akbl,k,l->ab", m["mom_tt"], beta, beta)
    M = m["mom_ww"].transpose(0, 3, 1, 2).reshape(q * q, q * q)      # (a,d) × (b,c)
    sig = np.linalg.lstsq(M, (R - m["mom_w"]).reshape(-1), rcond=None)[0].reshape(q, q)
    allowed = (mask.astype(float) @ mask.T.astype(float)) > 0
    sig = np.where(allowed, 0.5 * (sig + sig.T), 0.0) * np.outer(zscale, zscale)
    var = np.diag(sig)
    root = np.sqrt(np.where(var > 0, var, np.inf))
    corr = np.clip(sig / np.outer(root, root), -0.9, 0.9)
    np.fill_diagonal(corr, 1.0)
    lam, vec = np.linalg.eigh(corr)
    corr = vec @ np.diag(np.maximum(lam, 0.05)) @ vec.T
    corr /= np.sqrt(np.outer(np.diag(corr), np.diag(corr)))
    sd = np.sqrt(np.maximum(var, floor**2))
    cov = np.where(allowed, np.outer(sd, sd) * corr, 0.0)
    L = np.linalg.cholesky(cov)
    r_idx, c_idx = theta_index(mask)
    return L[r_idx, c_idx], cov / np.outer(zscale, zscale)
