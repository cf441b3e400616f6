"""Satterthwaite degrees of freedom for the fixed effects of a linear mixed model, from the sites' sums.

lmerTest (Kuznetsova, Brockhoff & Christensen 2017, J. Stat. Softw. 82(13), section 3) tests a contrast
Lᵀβ with t = Lᵀβ̂ / sqrt(v), v = Lᵀ C(τ) L, C = Var(β̂) as a function of the variance parameters
τ = (θ, σ) (lme4's θ, the residual SD σ), and

    df = 2 v² / (gᵀ W g),    g = ∂v/∂τ,    W = 2 D⁻¹,    D = ∂²dev(τ)/∂τ∂τᵀ at τ̂,

where dev(θ, σ) is the REML or ML criterion with σ not profiled out (lmerTest's ``devfun_vp``):

    dev = d(θ) + m log(2πσ²) + RSS(θ)/σ² [+ log det A(θ)],    m = n − p (REML) or n (ML),

with the cross-product sums of :mod:`fedglmm.likelihood.lmm` -- A = XᵀV⁻¹X, b = XᵀV⁻¹y, c = yᵀV⁻¹y,
d = log det V -- and RSS = c − bᵀA⁻¹b; C(θ, σ) = σ² A(θ)⁻¹.  lmerTest takes D and ∂C/∂τ by finite
differences of refits; here both are exact, from the sites' sums and their first and second θ-derivatives
at the estimate (the sums of the final round): no extra round.  The df is invariant to how τ is
parametrised, so the internal θ̃ (:mod:`fedglmm.model.spec`) serves as well as lme4's θ.
"""
from __future__ import annotations

import numpy as np


def varpar_hessian(s: dict, reml: bool) -> tuple[np.ndarray, float]:
    """D, the Hessian of dev(θ, σ) at (θ, σ̂(θ)) from the summed sums ``s`` at θ, and σ̂²."""
    A, b, c, n = s["A"], s["b"], s["c"], s["n"]
    p = len(b)
    m = n - p if reml else n
    Ainv = np.linalg.inv(A)
    beta = Ainv @ b
    rss = float(c - b @ beta)
    s2 = rss / m
    k = len(s.get("dd", []))
    D = np.zeros((k + 1, k + 1))
    D[k, k] = -2.0 * m / s2 + 6.0 * rss / s2**2
    if k == 0:
        return D, s2
    dA, db, dc = s["dA"], s["db"], s["dc"]
    drss = dc - 2.0 * db @ beta + np.einsum("p,tpr,r->t", beta, dA, beta)
    dbeta = np.einsum("pr,tr->tp", Ainv, db - np.einsum("tpr,r->tp", dA, beta))
    d2rss = s["d2c"] - 2.0 * np.einsum("stp,p->st", s["d2b"], beta) \
        + np.einsum("p,stpr,r->st", beta, s["d2A"], beta) - 2.0 * dbeta @ A @ dbeta.T
    Dtt = s["d2d"] + d2rss / s2
    if reml:
        AidA = np.einsum("pr,trs->tps", Ainv, dA)
        Dtt = Dtt + np.einsum("pr,strp->st", Ainv, s["d2A"]) - np.einsum("tps,usp->tu", AidA, AidA)
    sigma = np.sqrt(s2)
    D[:k, :k] = 0.5 * (Dtt + Dtt.T)
    D[:k, k] = D[k, :k] = -2.0 * drss / sigma**3
    D[k, k] = -2.0 * m / s2 + 6.0 * rss / s2**2
    return D, s2


def satterthwaite_df(s: dict, reml: bool, L: np.ndarray) -> np.ndarray:
    """Satterthwaite df of each contrast (row of ``L``, in the internal coefficients γ of the sums).

    ``s``: the sites' summed sums at the estimate θ̂ (A, b, c, d, n and, with random effects, their first
    and second θ-derivatives).  Without random effects the df are n − p (the t-test of a linear model).
    """
    L = np.atleast_2d(np.asarray(L, float))
    n, p = int(s["n"]), len(s["b"])
    k = len(s.get("dd", []))
    if k == 0:
        return np.full(L.shape[0], float(n - p))
    D, s2 = varpar_hessian(s, reml)
    W = 2.0 * np.linalg.pinv(D, hermitian=True)
    Ainv = np.linalg.inv(s["A"])
    AL = Ainv @ L.T                                              # (p, r)
    v = s2 * np.einsum("rp,pr->r", L, AL)                        # Var(Lᵀβ̂)
    g = np.empty((k + 1, L.shape[0]))
    g[:k] = -s2 * np.einsum("pr,tps,sr->tr", AL, s["dA"], AL)    # ∂v/∂θ_t = −σ² Lᵀ A⁻¹ dA_t A⁻¹ L
    g[k] = 2.0 * np.sqrt(s2) * v / s2                            # ∂v/∂σ = 2σ Lᵀ A⁻¹ L
    denom = np.einsum("tr,tu,ur->r", g, W, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2.0 * v**2 / denom, np.inf)
