"""Moment estimates behind the starting values: the binomial null step, and the random-effect covariance
from the working residuals' group moments, turned into θ."""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from ..model.spec import theta_index


def null_step(s: dict, family: Family, A: np.ndarray, eta: list | None = None):
    """The IRLS step from the intercept-only model (see :func:`fedglmm.likelihood.starts.null_step_start`):
    γ and (ω, α, δ).  Binomial, V(μ) = μ(1 − μ); Gamma (inverse and identity links), V(μ) = μ² (its
    dispersion cancels from the step).  ``eta`` receives the intercept-only linear predictor c."""
    binomial = family.name == "binomial"
    mean = min(max(s["st_sy"] / s["st_sv"], 1e-6), 1.0 - 1e-6) if binomial else s["st_sy"] / s["st_sv"]
    c = float(family.linkfun(mean))
    mu = float(family.mean(c))
    h = 1e-6 * (1.0 if binomial else max(1.0, abs(c)))
    kappa = float((family.mean(c + h) - family.mean(c - h)) / (2.0 * h))
    var = mu * (1.0 - mu) if binomial else mu * mu
    omega, alpha, delta = kappa**2 / var, kappa / var, (kappa**2 * c - kappa * mu) / var
    gamma = np.linalg.solve(A.T @ (omega * s["st_xvx"]) @ A, A.T @ (alpha * s["st_xy"] + delta * s["st_xv"]))
    if eta is not None:
        eta.append(c)
    return gamma, (omega, alpha, delta)


def binomial_moments(s: dict, omega, alpha, delta, suffix: str = "") -> dict:
    """The working residuals' group moments of the binomial null step (keys ``mom_*``)."""
    g = {k: s[k + suffix] for k in ("st_aa", "st_ab", "st_bb", "st_at", "st_bt", "st_tt", "st_ww", "st_w")}
    return {"mom_ss": alpha**2 * g["st_aa"] + alpha * delta * (g["st_ab"] + g["st_ab"].T) + delta**2 * g["st_bb"],
            "mom_st": omega * (alpha * g["st_at"] + delta * g["st_bt"]), "mom_tt": omega**2 * g["st_tt"],
            "mom_ww": omega**2 * g["st_ww"], "mom_w": omega * g["st_w"]}


def conditional(gamma, family: Family, s2: float):
    """Marginal to conditional coefficients given s² = E[zᵀΣz] (see :func:`null_step_start`)."""
    if family.link == "logit":
        return gamma * np.sqrt(1.0 + 0.346 * s2)
    if family.link == "probit":
        return gamma * np.sqrt(1.0 + s2)
    return gamma


# the least SD of a moment start on the internal scale (θ = 0 is a saddle of the symmetric objective)
SD_FLOOR = 0.5


def moment_start(m: dict, beta: np.ndarray, mask: np.ndarray, zscale: np.ndarray, floor: float = SD_FLOOR,
                 noise=None):
    """θ̃ (on the internal Z scale) from the working residuals' group moments, and the raw Σ it implies.

    Σ_g r_g r_gᵀ ≈ Σ_g W_g Σ W_g + Σ_g W_g with r_g = s_g − T_g β, s_g = Σ_j w_j z_j ζ_j, T_g = Σ_j w_j ζ_j x_jᵀ
    and W_g = Σ_j w_j ζ_j ζ_jᵀ over a group's rows: the left side is a quadratic in β whose coefficients
    are sums over groups.  The linear system in Σ is solved by least squares and restricted to the model's
    pattern; on the internal scale each standard deviation is at least ``floor`` (θ = 0 is a saddle of
    the symmetric objective, and a start near it wastes rounds) and correlations are kept within ±0.9.
    ``noise``: Σ_g of the working residuals' own covariance, when it is not Σ_g W_g (a dispersion).
    """
    return sigma_theta(moment_sigma(m, beta, mask, noise), mask, zscale, floor)


def moment_sigma(m: dict, beta: np.ndarray, mask: np.ndarray, noise=None) -> np.ndarray:
    """The least-squares Σ of :func:`moment_start` on the data scale, restricted to the model's pattern."""
    q = mask.shape[0]
    stb = m["mom_st"] @ beta
    R = m["mom_ss"] - stb - stb.T + np.einsum("akbl,k,l->ab", m["mom_tt"], beta, beta)
    M = m["mom_ww"].transpose(0, 3, 1, 2).reshape(q * q, q * q)      # (a,d) × (b,c)
    sig = np.linalg.lstsq(M, (R - (m["mom_w"] if noise is None else noise)).reshape(-1), rcond=None)[0].reshape(q, q)
    allowed = (mask.astype(float) @ mask.T.astype(float)) > 0
    return np.where(allowed, 0.5 * (sig + sig.T), 0.0)


def sigma_theta(sig: np.ndarray, mask: np.ndarray, zscale: np.ndarray, floor: float = SD_FLOOR):
    """θ̃ from a data-scale Σ (SDs floored and correlations clipped on the internal scale, see
    :func:`moment_start`), and the data-scale Σ it stands for."""
    allowed = (mask.astype(float) @ mask.T.astype(float)) > 0
    sig = sig * np.outer(zscale, zscale)
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
