"""Starting values from the set-up sums: one IRLS step from a null model and a moment estimate of the
random-effect covariance (binomial; Gamma with the inverse or identity link), or from μ = y + ½ (poisson,
negative binomial) or μ = y (Gamma, log link), and for families with a dispersion parameter a moment
estimate of it from the within-group regression; all on the internal scale."""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from .factor_starts import factor_start
from .moment_estimates import SD_FLOOR, binomial_moments, conditional, moment_start, null_step  # noqa: F401
from .setup import Setup
from .start_sums import from_null_model


# The negative binomial's −ℓ flattens towards the poisson limit like a e^{−ψ} + b e^{−2ψ} (ψ = log ϑ): from a
# start below the optimum, Newton in ψ advances by about ½ a round (the step of c e^{−2ψ}).  The first round
# also tries the start with ϑ e² and e⁴ times larger: points of one round, local work, no extra round.
NB_PSI_SHIFTS = (2.0, 4.0)
# A Gamma model with the log link floors the moment start's SDs at this, not SD_FLOOR: its random effects move
# log μ, often by 0.1 or less (a group's CV), and its moment estimate is good -- its noise, Var(log y) = ψ₁(ν) a
# row, comes from the within-group regression.  sleepstudy's Gamma fit: moment SDs 0.096 and 0.088 where the fit's
# are 0.101 and 0.093; floored at 0.5, its one site's own fit took 7 Newton steps instead of 4.
GAMMA_SD_FLOOR = 0.05


def start_values(st: Setup, family: Family, floor: float = SD_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """(γ0, θ̃0) on the internal scale from the set-up sums; for a family with a dispersion parameter θ̃0
    ends with its ψ0 (the optimiser's parameters are (γ, θ̃, ψ)).  ``floor``: the least SD of the moment
    estimate of Σ on the internal scale (binomial and poisson; see
    :func:`~fedglmm.likelihood.moment_estimates.moment_start`)."""
    s, A, mask, zs, n = st.sums, st.A, st.mask, st.zs, st.n
    q = mask.shape[0]
    # one grouping factor whose levels are shared by sites is laid out as one of several, but its set-up
    # sums are those of one factor
    several = bool(st.factor_groups) and any(k.endswith(".0") for k in s)
    if family.name == "binomial" and not several:
        return null_step_start(s, family, A, mask, zs, s["ztz"] / n, floor=floor)
    psi0 = dispersion_start(st, family) if family.ndisp else None
    if several:
        return factor_start(st, family, psi0)
    if from_null_model(family):
        gamma0, theta0 = null_step_start(s, family, A, mask, zs, s["ztz"] / n, np.exp(-psi0))
        return gamma0, np.r_[theta0, psi0]
    gamma0 = np.linalg.solve(A.T @ s["xtwx"] @ A, A.T @ s["xtwz"])
    theta0 = np.zeros(0)
    intercept = st.names.index("Intercept") if "Intercept" in st.names else None
    if q:
        # the working residuals' own variance: 1/w (poisson), 1/w + 1/ϑ (negative binomial), 1/(νw) (Gamma)
        noise = None if psi0 is None else (s["mom_w"] + np.exp(-psi0) * s["mom_w2"]
                                           if family.name == "negative_binomial" else np.exp(-psi0) * s["mom_w"])
        least = floor if family.name == "poisson" else GAMMA_SD_FLOOR if family.name == "gamma" else SD_FLOOR
        theta0, sig0 = moment_start(s, A @ gamma0, mask, zs, least, noise=noise)
        if intercept is not None and family.name != "gamma":
            # the IRLS weights grow like e^b, so the weighted start overstates the intercept by ≈ E[zᵀΣz]
            gamma0[intercept] -= np.trace(sig0 @ s["ztz"]) / n
    if family.name == "gamma" and intercept is not None:
        from scipy import special

        # the step regresses log y, whose mean is log μ + ψ₀(ν) − log ν
        gamma0[intercept] += psi0 - special.digamma(np.exp(psi0))
    return gamma0, theta0 if psi0 is None else np.r_[theta0, psi0]


def dispersion_start(st: Setup, family: Family) -> float:
    """ψ0 from the within-group regression of z on X (:func:`fedglmm.likelihood.start_sums.within_sums`),
    whose residual variance v is free of the random intercepts: Gamma, z = log y and Var(log y) = ψ₁(ν), so
    ν0 = ψ₁⁻¹(v); negative binomial, z = y and v ≈ mean(μ) + mean(μ²)/ϑ, so 1/ϑ0 = (v − ȳ)/(mean(y²) − v)."""
    s, A = st.sums, st.A
    Sxx, Sxz = A.T @ s["st_wxx"] @ A, A.T @ s["st_wxz"]
    coef = np.linalg.lstsq(Sxx, Sxz, rcond=1e-10)[0]
    rank = np.linalg.matrix_rank(Sxx, tol=1e-10 * max(1.0, np.max(np.abs(Sxx))))
    v = max(float(s["st_wzz"] - Sxz @ coef) / max(float(s["st_wdf"]) - rank, 1.0), 1e-12)
    if family.name == "gamma":
        return float(np.log(_inverse_trigamma(v)))
    m1, m2 = float(s["st_z1"]) / st.n, float(s["st_z2"]) / st.n
    over = (v - m1) / max(m2 - v, m1 * m1, 1e-12)
    return float(np.log(np.clip(1.0 / over, 1e-2, 1e4) if over > 0 else 1e4))


def _inverse_trigamma(v: float) -> float:
    """x > 0 with ψ₁(x) = v (Newton on log x; ψ₁ falls from ∞ to 0 like 1/x + 1/(2x²))."""
    from scipy import special

    t = np.log(1.0 / v + 0.5) if v < 1.0 else -0.5 * np.log(v)
    for _ in range(50):
        x = np.exp(t)
        step = (np.log(special.polygamma(1, x)) - np.log(v)) / (x * special.polygamma(2, x) / special.polygamma(1, x))
        t -= step
        if abs(step) < 1e-12:
            break
    return float(np.exp(t))


def null_step_start(s: dict, family: Family, A: np.ndarray, mask: np.ndarray, zscale: np.ndarray,
                    zz: np.ndarray, dispersion: float = 1.0, floor: float = SD_FLOOR):
    """Binomial (and Gamma, inverse and identity links) starting values: one IRLS step from the
    intercept-only model, a moment estimate of Σ, and the marginal-to-conditional correction of the
    coefficients.

    c = link(Σy / Σm) gives μ(c), κ = μ'(c) and V = μ(1 − μ) (Gamma: μ², the working residuals' variance
    then ``dispersion``/w: 1/ν); then XᵀWX = ω XᵀMX and
    XᵀWz = α Xᵀy + δ Xᵀm with ω = κ²/V, α = κ/V, δ = (κ²c − κμ(c))/V (see :func:`fedglmm.likelihood.start_sums.start_sums`).
    The step estimates marginal (population-averaged) coefficients; with the first estimate of Σ and
    s² = E[zᵀΣz] they become conditional ones: logit β·√(1 + 0.346 s²) (Zeger, Liang & Albert 1988,
    Biometrics 44, eq. 2.3), probit β·√(1 + s²) (exact); cloglog is left as it is.
    """
    eta = []
    gamma, coef = null_step(s, family, A, eta)
    if not mask.size:
        return gamma, np.zeros(0)
    mom = binomial_moments(s, *coef)
    if family.name == "binomial":
        theta, sig = moment_start(mom, A @ gamma, mask, zscale, floor)
    else:       # η is on the outcome's scale (or its inverse): so is the least standard deviation of a start
        theta, sig = moment_start(mom, A @ gamma, mask, zscale, 0.1 * abs(eta[0]), dispersion * mom["mom_w"])
    return conditional(gamma, family, float(np.trace(sig @ zz))), theta


def domain_start(st: Setup, family: Family, gamma0: np.ndarray, theta0: np.ndarray) -> list | None:
    """Starts inside a Gamma model's domain where its link bounds η (inverse: η > 0; identity: μ > 0), or
    None.  The one IRLS step of :func:`null_step_start`, (γ0, θ̃0), can leave the domain at some rows (strong
    covariates, a large random-effect variance: the objective is then not finite there); the fit then tries
    these in one more first round (:func:`~fedglmm.likelihood.drive.run`'s ``fallback``): the intercept-only
    model η = link(Σy / Σn) -- valid at every row -- with the random-effect SDs a quarter of θ̃0's, and the
    points ¾, ½ and ¼ of the way from it to (γ0, θ̃0); the best of them inside the domain is kept."""
    if not family.positive_eta or "Intercept" not in st.names or "st_sy" not in st.sums:
        return None
    beta = np.zeros(len(st.names))
    beta[st.names.index("Intercept")] = float(family.linkfun(st.sums["st_sy"] / st.sums["st_sv"]))
    k = int(st.mask.sum())
    theta = np.asarray(theta0, float)
    inside = np.r_[np.linalg.solve(st.A, beta), 0.25 * theta[:k], theta[k:]]
    start = np.r_[np.asarray(gamma0, float), theta]
    return [inside + t * (start - inside) for t in (0.75, 0.5, 0.25)] + [inside]
