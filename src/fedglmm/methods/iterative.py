"""The exact iterative method: Newton rounds on the sum of the sites' log-likelihoods.

Rounds (each one broadcast to all sites and one reply from each):

1. ``describe``: each site's columns and levels; the coordinator merges them into one schema and checks
   that every group lives at one site;
2. ``setup``: each site builds its design; it returns counts, column moments (for internal scaling) and
   the sums of a one-step linearised fit (starting values);
3. ``evaluate`` × k: trust-region Newton (:mod:`fedglmm.optimize`) on the summed log-likelihood
   (GLMM: Laplace / AGHQ in φ = (β, θ); gaussian: the exact profiled (RE)ML criterion in θ);
4. ``finalize``: the sums at the estimate (for standard errors and logLik) and each group's conditional
   modes, computed by its own site.

Internally the fixed-effect columns are centred and scaled (x̃ = (x − mean)/sd, from the pooled
moments), so that badly scaled covariates cost no rounds; estimates and their covariance are mapped
back with β = Aγ, Cov(β) = A Cov(γ) Aᵀ.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..design import _natural_order, merge_schema
from ..errors import ConvergenceError, FedGLMMError, InputError
from ..families import Family
from ..formula import parse_formula
from ..gaussian import profiled_deviance
from ..optimize import NewtonConfig, TrustRegionNewton
from ..protocol import request
from ..results import FitResult
from ..spec import ModelSpec, lambda_matrix, theta_index


@dataclass(frozen=True)
class FitOptions:
    nagq: int = 1
    reml: bool = True
    curvature: str = "observed"
    penalty: float = 0.0        # λ of an L2 penalty λ‖β‖² on the fixed effects but the intercept
    newton: NewtonConfig = NewtonConfig()


def _sum_replies(replies: dict, keys) -> dict:
    vals = list(replies.values())
    return {k: sum(np.asarray(r[k], float) for r in vals) for k in keys}


def scaling_transform(names: list[str], colsum: np.ndarray, colsq: np.ndarray, n: int) -> np.ndarray:
    """A with X̃ = XA: centre and scale each column by its pooled mean and SD (intercept kept as is)."""
    p = len(names)
    A = np.eye(p)
    has_int = "Intercept" in names
    mean = colsum / n
    for j, name in enumerate(names):
        if name == "Intercept":
            continue
        if has_int:
            sd = np.sqrt(max(colsq[j] / n - mean[j] ** 2, 0.0))
            if sd <= 1e-12 * max(1.0, abs(mean[j])):
                raise InputError(f"fixed-effect column '{name}' is constant over all sites "
                                 "and duplicates the intercept")
            A[j, j] = 1.0 / sd
            A[names.index("Intercept"), j] = -mean[j] / sd
        else:
            rms = np.sqrt(colsq[j] / n)
            if rms == 0:
                raise InputError(f"fixed-effect column '{name}' is zero over all sites")
            A[j, j] = 1.0 / rms
    return A


def _check_rank(names, xtx_scaled):
    lam, vec = np.linalg.eigh(xtx_scaled)
    if lam[0] <= 1e-10 * lam[-1]:
        bad = [names[i] for i in np.flatnonzero(np.abs(vec[:, 0]) > 1e-3)]
        raise InputError("fixed-effect columns are linearly dependent over the pooled data: " + ", ".join(bad))


@dataclass
class Setup:
    """What the coordinator knows after schema agreement and set-up (all in the agreed, global coding)."""

    spec: ModelSpec
    schema: object
    names: list
    znames: list
    mask: np.ndarray
    n: int
    ngroups: int
    sums: dict                  # setup replies summed over sites
    A: np.ndarray               # X̃ = X A
    zs: np.ndarray              # Z̃ = Z / zs

    @property
    def scale(self) -> dict:
        return {"transform": self.A, "zscale": self.zs}

    @property
    def theta_scale(self) -> np.ndarray:
        """θ̃ = θ · theta_scale: each θ entry's Z column scale (Λ̃ = diag(zs) Λ)."""
        return self.zs[theta_index(self.mask)[0]] if self.mask.shape[0] else np.zeros(0)

    def internal_transform(self) -> np.ndarray:
        """T with (γ, θ̃) = T (β, θ): the internal scale from the user's (γ = A⁻¹β, θ̃ = diag(zs) θ)."""
        p, ts = len(self.names), self.theta_scale
        T = np.zeros((p + len(ts), p + len(ts)))
        T[:p, :p] = np.linalg.solve(self.A, np.eye(p))
        T[p:, p:] = np.diag(ts)
        return T


def agree_schema(transport, formula: str, spec: ModelSpec, family: Family):
    """Round 1: each site describes its columns, levels and groups; one schema comes back."""
    desc = transport.broadcast(request("describe", formula=formula))
    return merge_schema(desc, spec, family)


def setup_request(formula: str, family: Family, options: FitOptions, schema) -> dict:
    return request("setup", formula=formula, family=family.name, link=family.link, nagq=options.nagq,
                   reml=options.reml, curvature=options.curvature,
                   schema={"kinds": schema.kinds, "levels": schema.levels})


def make_setup(spec: ModelSpec, schema, replies: dict) -> Setup:
    """Scaling and counts from the sites' set-up sums (replies in the global coding)."""
    first = next(iter(replies.values()))
    names, znames = list(first["x_names"]), list(first["z_names"])
    mask = np.asarray(first["theta_mask"], bool)
    n = int(sum(r["n"] for r in replies.values()))
    ngroups = int(sum(r["ngroups"] for r in replies.values()))
    keys = [k for k, v in first.items() if isinstance(v, (np.ndarray, float, int)) and k not in ("n", "ngroups")
            and k != "theta_mask"]
    sums = _sum_replies(replies, keys)
    A = scaling_transform(names, sums["colsum"], sums["colsq"], n)
    _check_rank(names, A.T @ sums["xtx"] @ A)
    zs = np.sqrt(np.diag(sums["ztz"]) / n) if mask.shape[0] else np.ones(0)   # Z̃ = Z / zs: Λ̃ = diag(zs) Λ
    zs = np.where(zs > 0, zs, 1.0)
    return Setup(spec, schema, names, znames, mask, n, ngroups, sums, A, zs)


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


def optimize(transport, st: Setup, family: Family, options: FitOptions, start=None, first_extra=None,
             surrogate=None) -> dict:
    """The Newton rounds and the final round; ``start`` overrides the set-up start values (internal
    scale: (γ, θ̃) for GLMMs, θ̃ for gaussian models); ``first_extra`` rides on the first request;
    ``surrogate(x) -> (f, g, H)`` is a local stand-in for −ℓ (GLMMs; see :func:`surrogate_model`)."""
    if family.name == "gaussian":
        return _fit_lmm(transport, st.scale, st.mask, options, start, first_extra)
    if start is not None and isinstance(start[0], tuple):
        # several candidate starts (γ, θ̃), all evaluated in the first round; the best one is kept
        (gamma0, theta0), others = start[0], [np.concatenate(s) for s in start[1:]]
        return _fit_glmm(transport, st.scale, st.mask, gamma0, theta0, options, first_extra, others, st.names,
                         surrogate)
    gamma0, theta0 = start if start is not None else start_values(st, family)
    return _fit_glmm(transport, st.scale, st.mask, gamma0, theta0, options, first_extra, names=st.names,
                     surrogate=surrogate)


def fit_iterative(transport, formula: str, family: Family, options: FitOptions = FitOptions()) -> FitResult:
    """Fit by exact Newton rounds over the sites reached through ``transport``."""
    t0 = time.perf_counter()
    spec = _check_options(formula, family, options)
    schema = agree_schema(transport, formula, spec, family)
    st = make_setup(spec, schema, transport.broadcast(setup_request(formula, family, options, schema)))
    core = optimize(transport, st, family, options)
    return make_result(formula, family, options, st, core, transport, t0)


def local_fit(frame, formula: str, family: Family, options: FitOptions, site_id: str) -> dict | None:
    """A site's own fit of some of its rows (no rounds: the site is its own coordinator), as an estimate
    and its information on the user's scale: β, θ and the information matrix of (β, θ).  None when the
    fit fails or does not converge."""
    from ..site import Site
    from ..transport import InProcessTransport

    try:
        transport = InProcessTransport({site_id: Site(site_id, frame)})
        spec = _check_options(formula, family, options)
        schema = agree_schema(transport, formula, spec, family)
        st = make_setup(spec, schema, transport.broadcast(setup_request(formula, family, options, schema)))
        core = optimize(transport, st, family, options)
    except (FedGLMMError, np.linalg.LinAlgError, ValueError, FloatingPointError):
        return None
    if not core["converged"] or "info" not in core:
        return None
    T = st.internal_transform()
    return {"names": list(st.names), "beta": st.A @ core["gamma"], "theta": core["theta"] / st.theta_scale,
            "info": T.T @ core["info"] @ T}


def _check_options(formula: str, family: Family, options: FitOptions) -> ModelSpec:
    spec = parse_formula(formula)
    if options.penalty < 0 or not np.isfinite(options.penalty):
        raise InputError(f"the penalty must be a non-negative number, not {options.penalty}")
    if options.penalty and family.name == "gaussian":
        raise InputError("the L2 penalty is available for binomial and poisson models")
    if family.name == "gaussian" and options.nagq > 1:
        raise InputError("nagq applies to binomial and poisson models; gaussian likelihoods are exact")
    if spec.random == () and options.nagq > 1:
        raise InputError("nagq needs a random-effects term in the formula")
    return spec


def make_result(formula, family, options, st: Setup, core: dict, transport, t0, method=None) -> FitResult:
    """The FitResult on the user's scale from the optimiser's output on the internal scale."""
    names, znames, mask, A, zs = st.names, st.znames, st.mask, st.A, st.zs
    p, q = len(names), mask.shape[0]
    final = core["final"]
    beta = A @ core["gamma"]
    vcov = A @ core["vcov_gamma"] @ A.T
    group = st.spec.group
    cov_re = modes = condsd = None
    theta = np.asarray(core["theta"])
    if q and np.min(np.abs(theta[_diagonal(mask)])) < 1e-4:
        core["messages"].append("boundary (singular) fit: the random-effect covariance is singular (a standard "
                                "deviation at zero or a correlation of ±1)")
    if q:
        r_idx, c_idx = theta_index(mask)
        theta = theta / zs[r_idx]                                     # Λ = diag(zs)⁻¹ Λ̃
        lam = lambda_matrix(theta, q, (r_idx, c_idx))
        scale2 = core.get("sigma2", 1.0)
        cov_re = pd.DataFrame(scale2 * lam @ lam.T, index=znames, columns=znames)
        # a site may withhold the modes of its small groups (its min_group rule): they are NaN here
        withheld = [lv for r in final.values() for lv in r.get("withheld", [])]
        levels = [lv for r in final.values() for lv in r["levels"]] + withheld
        gap = np.full((len(withheld), q), np.nan)
        modes = pd.DataFrame(np.vstack([np.reshape(r["modes"], (-1, q)) for r in final.values()] + [gap]) / zs,
                             index=levels, columns=znames)
        condsd = pd.DataFrame(np.vstack([np.reshape(r["condsd"], (-1, q)) for r in final.values()] + [gap]) / zs,
                              index=levels, columns=znames)
        if withheld:
            core["messages"].append(f"conditional modes withheld by site rules for {len(withheld)} group"
                                    f"{'s' if len(withheld) != 1 else ''} (smaller than a site's min_group): "
                                    "ranef() shows NaN for them and predict() gives them the population-level "
                                    "prediction")
        order = _natural_order(np.asarray(levels, dtype=str))
        modes, condsd = modes.iloc[order], condsd.iloc[order]
    if method is None:
        method = ("REML" if options.reml else "ML") if family.name == "gaussian" else \
            ("GLM" if not q else ("Laplace" if options.nagq == 1 else f"AGHQ({options.nagq})"))
    if options.penalty:
        method += f", L2 penalty {options.penalty:g}"
        core["messages"].append(f"estimates maximise logLik − {options.penalty:g}·‖β‖² (intercept not penalised); "
                                "logLik is reported without the penalty, standard errors from the penalised "
                                "information")
    n_params = p + int(mask.sum()) + (1 if family.name == "gaussian" else 0)
    return FitResult(
        formula=formula, family=family, method=method, nagq=options.nagq,
        reml=bool(options.reml and family.name == "gaussian"),
        fixef=pd.Series(beta, index=names), vcov=pd.DataFrame(vcov, index=names, columns=names),
        cov_re=cov_re, residual_sd=float(np.sqrt(core["sigma2"])) if family.name == "gaussian" else None,
        loglik=float(core["loglik"]), n_params=n_params, nobs=st.n,
        ngroups={group: st.ngroups} if group else {}, nsites=len(transport.site_ids),
        rounds=transport.rounds, bytes_to_sites=transport.bytes_to_sites,
        bytes_from_sites=transport.bytes_from_sites, converged=bool(core["converged"]),
        seconds=time.perf_counter() - t0, group_name=group, modes=modes, condsd=condsd,
        theta=theta, spec=st.spec, schema=st.schema, messages=core["messages"],
        site_ids=list(transport.site_ids))


def null_step_start(s: dict, family: Family, A: np.ndarray, mask: np.ndarray, zscale: np.ndarray,
                    zz: np.ndarray):
    """Binomial starting values: one IRLS step from the intercept-only model, a moment estimate of Σ, and
    the marginal-to-conditional correction of the coefficients.

    c = link(Σy / Σm) gives μ(c), κ = μ'(c) and V = μ(1 − μ); then XᵀWX = ω XᵀMX and
    XᵀWz = α Xᵀy + δ Xᵀm with ω = κ²/V, α = κ/V, δ = (κ²c − κμ(c))/V (see :func:`fedglmm.site.start_sums`).
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


def _diagonal(mask) -> np.ndarray:
    """Positions in θ of the diagonal of Λ."""
    r_idx, c_idx = theta_index(mask)
    return np.flatnonzero(c_idx == r_idx)


def _theta_start(mask):
    r_idx, c_idx = theta_index(mask)
    return (r_idx == c_idx).astype(float)


def _run(opt: TrustRegionNewton, evaluate, canon):
    """Drive the optimiser; ``evaluate(points, final)`` does one round and returns ([(f, g, H)], reply).

    Each point is first put in canonical form (non-negative diagonal of Λ): the same model, so the
    iterates stay on one side of the sign symmetry of θ.  ``final`` marks the round that may be the last
    (the sites then also return their conditional modes).
    """
    xs, final, last_final = list(opt.starts), False, False
    while xs:
        xs = [canon(x) for x in xs]
        results, reply = evaluate(xs, final)
        last_final = final
        xs = opt.tell(xs, results)
        final = opt.final_candidate
    if not opt.converged:
        raise ConvergenceError(f"the fit did not converge: {opt.message}")
    if not last_final or opt.accepted is None:
        # converged at a point the last round did not end on (no step could gain more): one final
        # round there, for the sums at the point and the conditional modes
        _, reply = evaluate([opt.point], True)
    return opt.solution, reply


def _round(transport, xs, final, scale, keys, extra=None, first=None):
    """One round at the points xs: the sums over sites for each point, and the raw replies.

    ``first`` (a dict, emptied once used) rides on the first request of a fit, e.g. the set-up payload
    when no separate set-up round was held."""
    ride = dict(first) if first else {}
    if first:
        first.clear()
    if final:
        rep = transport.broadcast(request("finalize", point=xs[0], **scale, **(extra or {}), **ride))
        return [_sum_replies(rep, keys)], rep
    rep = transport.broadcast(request("evaluate", points=np.asarray(xs), **scale, **ride))
    per_point = [{sid: r["points"][i] for sid, r in rep.items()} for i in range(len(xs))]
    return [_sum_replies(pp, keys) for pp in per_point], rep


def _penalty_matrix(scale: dict, names: list | None, p: int, lam: float) -> np.ndarray:
    """λ AᵀDA: the penalty λ‖β‖² (intercept excluded, user's scale) as a quadratic form in γ (β = Aγ)."""
    A = scale["transform"]
    D = np.eye(p)
    if names is not None and "Intercept" in names:
        D[names.index("Intercept"), names.index("Intercept")] = 0.0
    return lam * A.T @ D @ A


def surrogate_model(surrogate):
    """A model step for :class:`TrustRegionNewton` from a local stand-in for the objective.

    ``surrogate(x) -> (f, g, H)`` approximates F (here −ℓ of pseudo-data with the sites' moments, computed
    at the coordinator at no round's cost).  At the current point x_k, where the sites gave the exact
    (g, H), the model is the surrogate corrected to agree with F to second order,

        S(x) = P(x) + (g − g_P(x_k))ᵀ(x − x_k) + ½ (x − x_k)ᵀ(H − H_P(x_k))(x − x_k),

    and its minimiser is the step (found locally by trust-region Newton on S).  Where P's third and
    higher derivatives resemble F's, this step lands closer to F's minimiser than the Newton step does --
    the idea of the communication-efficient surrogate likelihood (Jordan, Lee & Yang 2019, JASA 114:668),
    with pseudo-data in place of one site's own rows.  The difference F − P has third derivatives too (from
    groups the pseudo-data lack, above all): the change of its Hessian between the nearest other point the
    sites evaluated and x_k gives them along that direction, added to S as a cubic term."""
    cache = {}

    def P(x):
        key = np.asarray(x, float).tobytes()
        if key not in cache:
            cache.clear() if len(cache) > 64 else None
            cache[key] = surrogate(x)
        return cache[key]

    seen = []                    # points the sites evaluated: (x, H)
    last = {}                    # the point the model was last asked at, and F − P's Hessian there

    def observe(x, f, g, H):
        seen.append((np.array(x, float), np.array(H, float)))
        del seen[:-8]

    def model(x, f, g, H):
        try:
            fp, gp, Hp = P(x)
            dg, dH = g - gp, H - Hp
            # the difference F − P along the path: its Hessian changed by M over the last move d, a
            # secant estimate of its third derivative in that direction, kept as the cubic
            # C(s) = (sᵀMs)(uᵀs)/6 with u = d/dᵀd (exact for s ∥ d; zero with its derivatives at s = 0)
            M = u = None
            w = np.abs(np.diag(H))
            if "x" in last and np.any(last["x"] != x):         # along the path: from the last point
                y, dHy = last["x"], last["dH"]
            else:                                             # first round: the nearest other start
                others = [(float(((y - x) ** 2) @ w), y, Hy) for y, Hy in seen if np.any(y != x)]
                y, dHy = (None, None) if not others else (lambda t: (t[1], t[2] - P(t[1])[2]))(
                    min(others, key=lambda t: t[0]))
            if y is not None:
                d = x - y
                M, u = dH - dHy, d / (d @ d)
                M = (M + M.T) / 2
            last.update(x=np.array(x, float), dH=dH)

            def S(z):
                fz, gz, Hz = P(z)
                s = z - x
                val, grad, hess = fz + dg @ s + 0.5 * s @ dH @ s, gz + dg + dH @ s, Hz + dH
                if M is not None:
                    Ms, us = M @ s, u @ s
                    val += (s @ Ms) * us / 6.0
                    grad = grad + Ms * us / 3.0 + (s @ Ms) * u / 6.0
                    hess = hess + (M * us + np.outer(Ms, u) + np.outer(u, Ms)) / 3.0
                return val, grad, hess

            inner = TrustRegionNewton(x, NewtonConfig(tol=1e-10, near=1e-4, max_evals=8))
            pts = inner.starts
            while pts:
                pts = inner.tell(pts, [S(z) for z in pts])
            z = inner.solution if inner.converged else inner.current.x
            return z - x, fp - S(z)[0]
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            return None

    model.observe = observe
    return model


def _fit_glmm(transport, scale, mask, gamma0, theta0, options, first_extra=None, starts=None, names=None,
              surrogate=None):
    p = len(gamma0)
    keys = ["value", "grad", "hess"]
    first = dict(first_extra or {})
    P = _penalty_matrix(scale, names, p, options.penalty) if options.penalty else None

    def penalised(x, f, g, H):
        """The coordinator's objective: −ℓ plus the penalty (the sites never see λ)."""
        if P is None:
            return f, g, H
        gam = x[:p]
        g, H = g.copy(), H.copy()
        g[:p] += 2.0 * P @ gam
        H[:p, :p] += 2.0 * P
        return f + gam @ P @ gam, g, H

    def evaluate(xs, final):
        sums, rep = _round(transport, xs, final, scale, keys, first=first)
        return [penalised(x, -float(s["value"]), -s["grad"], -s["hess"]) for x, s in zip(xs, sums)], (rep, sums[0])

    if starts is None:
        # the first round also tries the start covariance halved and doubled (local work, no extra round)
        starts = [np.concatenate([gamma0, f * theta0]) for f in (np.sqrt(0.5), np.sqrt(2.0))] if len(theta0) else []
    canon = lambda x: np.r_[x[:p], _canonical_theta(x[p:], mask)]   # noqa: E731
    opt = TrustRegionNewton(np.concatenate([gamma0, theta0]), options.newton, starts=starts,
                            model=surrogate_model(surrogate) if surrogate is not None else None)
    phi, (final, s) = _run(opt, evaluate, canon)
    info = -s["hess"]
    if P is not None:
        info[:p, :p] += 2.0 * P      # standard errors from the penalised information
    info = _information_at_estimate(opt, info, phi)
    messages = []
    try:
        cov = np.linalg.inv(np.linalg.cholesky(info))
        vcov_gamma = (cov.T @ cov)[:p, :p]
    except np.linalg.LinAlgError:
        messages.append("the Hessian is not positive definite at the estimate (a variance may be at its "
                        "boundary); standard errors are conditional on the variance parameters")
        vcov_gamma = np.linalg.inv(info[:p, :p])
    # the estimate is the last point plus its Newton step: its log-likelihood to second order
    step = phi - opt.point
    loglik = float(s["value"] + s["grad"] @ step + 0.5 * step @ s["hess"] @ step)
    return {"gamma": phi[:p], "theta": _canonical_theta(phi[p:], mask), "vcov_gamma": vcov_gamma,
            "loglik": loglik, "final": final, "info": info, "converged": opt.converged, "messages": messages}


def _information_at_estimate(opt, info, estimate):
    """The information at the estimate rather than at the last point visited: the Hessian's change
    between the last two points, scaled to the final step's component along that move (a secant
    estimate of the third derivative).  Kept only if it stays positive definite."""
    prev = opt.previous
    if prev is None or opt.point is None:
        return info
    d = opt.point - prev.x
    dd = d @ d
    if not dd > 0:
        return info
    t = float((estimate - opt.point) @ d / dd)
    if abs(t) > 1.0:
        return info
    corrected = info + t * (opt.current.H - prev.H)
    try:
        np.linalg.cholesky(corrected)
    except np.linalg.LinAlgError:
        return info
    return corrected


def _canonical_theta(theta, mask):
    """Flip columns of Λ so its diagonal is non-negative (Σ = ΛΛᵀ is unchanged)."""
    theta = np.array(theta, float)
    r_idx, c_idx = theta_index(mask)
    for col in np.unique(c_idx):
        diag = np.flatnonzero((c_idx == col) & (r_idx == col))
        if len(diag) and theta[diag[0]] < 0:
            theta[c_idx == col] *= -1.0
    return theta


def _fit_lmm(transport, scale, mask, options, start=None, first_extra=None):
    keys = ["n", "A", "b", "c", "d"]
    first = dict(first_extra or {})
    ntheta = int(mask.sum())
    if ntheta:
        keys += ["dA", "db", "dc", "dd", "d2A", "d2b", "d2c", "d2d"]
    profiles = {}

    def evaluate(xs, final):
        extra = None
        if final:
            # the sites' conditional modes need β̂ and σ̂ at this θ: to first order from the point the
            # final step was taken from (the estimates reported are recomputed from this round's sums)
            base = opt.current.x
            pr, step = profiles[base.tobytes()], xs[0] - base
            extra = {"beta_internal": pr.beta + pr.dbeta.T @ step,
                     "sigma": float(np.sqrt(pr.sigma2 + pr.dsigma2 @ step))}
        sums, rep = _round(transport, xs, final, scale, keys, extra, first=first)
        out = []
        for x, s in zip(xs, sums):
            pr = profiled_deviance(s, options.reml)
            profiles[np.asarray(x, float).tobytes()] = pr
            out.append((0.5 * pr.dev, 0.5 * pr.grad, 0.5 * pr.hess))
        return out, (rep, sums[0])

    if ntheta:
        opt = TrustRegionNewton(_theta_start(mask) if start is None else np.asarray(start, float), options.newton)
        theta, (final, s) = _run(opt, evaluate, lambda x: _canonical_theta(x, mask))
        converged = opt.converged
    else:
        theta, converged = np.zeros(0), True
        final = transport.broadcast(request("finalize", point=theta, **scale, **first))
        s = _sum_replies(final, keys)
    pr = profiled_deviance(s, options.reml, order=0)
    return {"gamma": pr.beta, "theta": _canonical_theta(theta, mask),
            "vcov_gamma": pr.sigma2 * np.linalg.inv(s["A"]),
            # REML's constant depends on how X is parametrised: report it for the user's columns
            "loglik": -0.5 * pr.dev + (np.linalg.slogdet(scale["transform"])[1] if options.reml else 0.0),
            "sigma2": pr.sigma2, "final": final, "converged": converged, "messages": []}
