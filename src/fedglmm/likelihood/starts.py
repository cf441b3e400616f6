"""Starting values from the set-up sums: one IRLS step from a null model and a moment estimate of the
random-effect covariance (binomial), or from μ = y + ½ (poisson); all on the internal scale."""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from .factor_starts import factor_start
from .moment_estimates import binomial_moments, conditional, moment_start, null_step  # noqa: F401
from .setup import Setup


def start_values(st: Setup, family: Family) -> tuple[np.ndarray, np.ndarray]:
    """(γ0, θ̃0) on the internal scale from the set-up sums (binomial and poisson)."""
    s, A, mask, zs, n = st.sums, st.A, st.mask, st.zs, st.n
    q = mask.shape[0]
    if st.factor_groups:
        return factor_start(st, family)
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
    XᵀWz = α Xᵀy + δ Xᵀm with ω = κ²/V, α = κ/V, δ = (κ²c − κμ(c))/V (see :func:`fedglmm.likelihood.start_sums.start_sums`).
    The step estimates marginal (population-averaged) coefficients; with the first estimate of Σ and
    s² = E[zᵀΣz] they become conditional ones: logit β·√(1 + 0.346 s²) (Zeger, Liang & Albert 1988,
    Biometrics 44, eq. 2.3), probit β·√(1 + s²) (exact); cloglog is left as it is.
    """
    gamma, coef = null_step(s, family, A)
    if not mask.size:
        return gamma, np.zeros(0)
    theta, sig = moment_start(binomial_moments(s, *coef), A @ gamma, mask, zscale)
    return conditional(gamma, family, float(np.trace(sig @ zz))), theta
