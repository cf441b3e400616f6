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

from ..design import merge_schema
from ..errors import ConvergenceError, InputError
from ..families import Family
from ..formula import parse_formula
from ..gaussian import profiled_deviance
from ..optimize import NewtonConfig, TrustRegionNewton
from ..protocol import request
from ..results import FitResult
from ..spec import ModelSpec


@dataclass(frozen=True)
class FitOptions:
    nagq: int = 1
    reml: bool = True
    curvature: str = "observed"
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


def fit_iterative(transport, formula: str, family: Family, options: FitOptions = FitOptions()) -> FitResult:
    """Fit by exact Newton rounds over the sites reached through ``transport``."""
    t0 = time.perf_counter()
    spec = parse_formula(formula)
    if family.name == "gaussian" and options.nagq > 1:
        raise InputError("nagq applies to binomial and poisson models; gaussian likelihoods are exact")
    if spec.random == () and options.nagq > 1:
        raise InputError("nagq needs a random-effects term in the formula")
    desc = transport.broadcast(request("describe", formula=formula))
    schema = merge_schema(desc, spec, family)
    setup = transport.broadcast(request(
        "setup", formula=formula, family=family.name, link=family.link, nagq=options.nagq,
        reml=options.reml, curvature=options.curvature, schema={"kinds": schema.kinds, "levels": schema.levels}))
    first = next(iter(setup.values()))
    names, znames = list(first["x_names"]), list(first["z_names"])
    mask = np.asarray(first["theta_mask"], bool)
    n = int(sum(r["n"] for r in setup.values()))
    ngroups = int(sum(r["ngroups"] for r in setup.values()))
    tot = _sum_replies(setup, ["colsum", "colsq", "xtx"])
    A = scaling_transform(names, tot["colsum"], tot["colsq"], n)
    _check_rank(names, A.T @ tot["xtx"] @ A)
    p, q = len(names), mask.shape[0]
    ntheta = int(mask.sum())
    if family.name == "gaussian":
        core = _fit_lmm(transport, A, mask, p, n, options)
    else:
        tot.update(_sum_replies(setup, ["xtwx", "xtwz"]))
        gamma0 = np.linalg.solve(A.T @ tot["xtwx"] @ A, A.T @ tot["xtwz"])
        theta0 = _theta_start(mask)
        if q:
            theta0 = moment_start(_sum_replies(setup, ["mom_ss", "mom_st", "mom_tt", "mom_ww", "mom_w"]),
                                  A @ gamma0, mask)
        core = _fit_glmm(transport, A, mask, gamma0, theta0, options)
    final = core["final"]

    beta = A @ core["gamma"]
    vcov = A @ core["vcov_gamma"] @ A.T
    group = spec.group
    cov_re = modes = condsd = None
    if q:
        lam = np.zeros((q, q))
        c_idx, r_idx = np.nonzero(mask.T)
        lam[r_idx, c_idx] = core["theta"]
        scale2 = core.get("sigma2", 1.0)
        cov_re = pd.DataFrame(scale2 * lam @ lam.T, index=znames, columns=znames)
        levels = [lv for r in final.values() for lv in r["levels"]]
        modes = pd.DataFrame(np.vstack([r["modes"] for r in final.values()]), index=levels, columns=znames)
        condsd = pd.DataFrame(np.vstack([r["condsd"] for r in final.values()]), index=levels, columns=znames)
        order = _natural_order(levels)
        modes, condsd = modes.iloc[order], condsd.iloc[order]
    method = ("REML" if options.reml else "ML") if family.name == "gaussian" else \
        ("GLM" if not q else ("Laplace" if options.nagq == 1 else f"AGHQ({options.nagq})"))
    n_params = p + ntheta + (1 if family.name == "gaussian" else 0)
    return FitResult(
        formula=formula, family=family, method=method, nagq=options.nagq,
        reml=bool(options.reml and family.name == "gaussian"),
        fixef=pd.Series(beta, index=names), vcov=pd.DataFrame(vcov, index=names, columns=names),
        cov_re=cov_re, residual_sd=float(np.sqrt(core["sigma2"])) if family.name == "gaussian" else None,
        loglik=float(core["loglik"]), n_params=n_params, nobs=n,
        ngroups={group: ngroups} if group else {}, nsites=len(transport.site_ids),
        rounds=transport.rounds, bytes_to_sites=transport.bytes_to_sites,
        bytes_from_sites=transport.bytes_from_sites, converged=bool(core["converged"]),
        seconds=time.perf_counter() - t0, group_name=group, modes=modes, condsd=condsd,
        theta=np.asarray(core["theta"]), spec=spec, schema=schema, messages=core["messages"],
        site_ids=list(transport.site_ids))


def _natural_order(levels):
    try:
        keys = [float(v) for v in levels]
    except ValueError:
        keys = list(levels)
    return np.argsort(np.asarray(keys, dtype=object), kind="stable")


def moment_start(m: dict, beta: np.ndarray, mask: np.ndarray, floor: float = 0.1) -> np.ndarray:
    """θ from the working residuals' group moments: Σ_g r_g r_gᵀ ≈ Σ_g W_g Σ W_g + Σ_g W_g.

    With r_g = s_g − T_g β (s_g = Σ_j w_j z_j ζ_j, T_g = Σ_j w_j ζ_j x_jᵀ, W_g = Σ_j w_j ζ_j ζ_jᵀ over a
    group's rows), the left side is a quadratic in β whose coefficients are sums over groups; the linear
    system in Σ is solved by least squares, Σ is made positive definite (standard deviations at least
    ``floor``) and restricted to the model's pattern before its Cholesky factor gives θ.
    """
    q = mask.shape[0]
    stb = m["mom_st"] @ beta
    R = m["mom_ss"] - stb - stb.T + np.einsum("akbl,k,l->ab", m["mom_tt"], beta, beta)
    M = m["mom_ww"].transpose(0, 3, 1, 2).reshape(q * q, q * q)      # (a,d) × (b,c)
    sig = np.linalg.lstsq(M, (R - m["mom_w"]).reshape(-1), rcond=None)[0].reshape(q, q)
    sig = 0.5 * (sig + sig.T)
    full = np.tril(np.ones((q, q), bool))
    sig = np.where(mask | mask.T | ~full & ~full.T, sig, 0.0) if not np.array_equal(mask, full) else sig
    sd = np.sqrt(np.maximum(np.diag(sig), floor**2))
    corr = sig / np.outer(np.sqrt(np.maximum(np.diag(sig), 1e-12)), np.sqrt(np.maximum(np.diag(sig), 1e-12)))
    corr = np.clip(np.where(np.eye(q, dtype=bool), 1.0, corr), -0.9, 0.9)
    corr[np.eye(q, dtype=bool)] = 1.0
    lam, vec = np.linalg.eigh(corr)
    corr = vec @ np.diag(np.maximum(lam, 0.05)) @ vec.T
    dd = np.sqrt(np.diag(corr))
    corr = corr / np.outer(dd, dd)
    L = np.linalg.cholesky(np.outer(sd, sd) * corr)
    c_idx, r_idx = np.nonzero(mask.T)
    return L[r_idx, c_idx]


def _theta_start(mask):
    c_idx, r_idx = np.nonzero(mask.T)
    return (r_idx == c_idx).astype(float)


def _run(opt: TrustRegionNewton, evaluate):
    """Drive the optimiser; ``evaluate(x, final)`` does one round (``final``: the round may be the last)."""
    x, final = opt.x0, False
    while x is not None:
        f, g, H, reply = evaluate(x, final)
        x = opt.tell(x, f, g, H)
        final = opt.final_candidate
    if not opt.converged:
        raise ConvergenceError(f"the fit did not converge: {opt.message}")
    return opt.solution, reply


def _fit_glmm(transport, A, mask, gamma0, theta0, options):
    p = len(gamma0)

    def evaluate(phi, final):
        rep = transport.broadcast(request("finalize" if final else "evaluate", phi=phi, transform=A))
        s = _sum_replies(rep, ["value", "grad", "hess"])
        return -float(s["value"]), -s["grad"], -s["hess"], (rep, s)

    opt = TrustRegionNewton(np.concatenate([gamma0, theta0]), options.newton)
    phi, (final, s) = _run(opt, evaluate)
    info = -s["hess"]
    messages = []
    try:
        cov = np.linalg.inv(np.linalg.cholesky(info))
        vcov_gamma = (cov.T @ cov)[:p, :p]
    except np.linalg.LinAlgError:
        messages.append("the Hessian is not positive definite at the estimate (a variance may be at its "
                        "boundary); standard errors are conditional on the variance parameters")
        vcov_gamma = np.linalg.inv(info[:p, :p])
    return {"gamma": phi[:p], "theta": _canonical_theta(phi[p:], mask), "vcov_gamma": vcov_gamma,
            "loglik": float(s["value"]), "final": final, "converged": opt.converged, "messages": messages}


def _canonical_theta(theta, mask):
    """Flip columns of Λ so its diagonal is non-negative (Σ = ΛΛᵀ is unchanged)."""
    theta = np.array(theta, float)
    c_idx, r_idx = np.nonzero(mask.T)
    for col in np.unique(c_idx):
        diag = np.flatnonzero((c_idx == col) & (r_idx == col))
        if len(diag) and theta[diag[0]] < 0:
            theta[c_idx == col] *= -1.0
    return theta


def _fit_lmm(transport, A, mask, p, n, options):
    keys = ["n", "A", "b", "c", "d"]
    ntheta = int(mask.sum())
    if ntheta:
        keys += ["dA", "db", "dc", "dd", "d2A", "d2b", "d2c", "d2d"]
    last = {}

    def evaluate(theta, final):
        extra = {}
        if final:
            # the sites' conditional modes need β̂ and σ̂ at this θ: to first order from the last round
            # (the estimates reported are recomputed exactly from this round's sums)
            pr, step = last["pr"], theta - last["theta"]
            extra = {"beta_internal": pr.beta + pr.dbeta.T @ step,
                     "sigma": float(np.sqrt(pr.sigma2 + pr.dsigma2 @ step))}
        rep = transport.broadcast(request("finalize" if final else "evaluate", theta=theta, transform=A,
                                          **extra))
        s = _sum_replies(rep, keys)
        pr = profiled_deviance(s, options.reml)
        last.update(theta=np.asarray(theta, float), pr=pr)
        return 0.5 * pr.dev, 0.5 * pr.grad, 0.5 * pr.hess, (rep, s)

    if ntheta:
        opt = TrustRegionNewton(_theta_start(mask), options.newton)
        theta, (final, s) = _run(opt, evaluate)
        converged = opt.converged
    else:
        theta, converged = np.zeros(0), True
        final = transport.broadcast(request("finalize", theta=theta, transform=A))
        s = _sum_replies(final, keys)
    pr = profiled_deviance(s, options.reml, order=0)
    return {"gamma": pr.beta, "theta": _canonical_theta(theta, mask),
            "vcov_gamma": pr.sigma2 * np.linalg.inv(s["A"]),
            # REML's constant depends on how X is parametrised: report it for the user's columns
            "loglik": -0.5 * pr.dev + (np.linalg.slogdet(A)[1] if options.reml else 0.0), "sigma2": pr.sigma2,
            "final": final, "converged": converged, "messages": []}
