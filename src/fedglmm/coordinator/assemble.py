"""The fit on the user's scale, assembled once from the estimate on the internal scale and the parts'
final replies: coefficients and their covariance, the random-effect covariance, conditional modes,
fit criteria and the notes that go with them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..likelihood.fit import LMM_DERIVATIVE_KEYS, LMM_KEYS, Estimate, diagonal_positions
from ..likelihood.runaway import runaway
from ..likelihood.setup import Setup, sum_replies
from ..model.families import Family
from ..model.labels import natural_order
from ..model.options import FitOptions
from ..model.spec import ModelSpec, Schema, lambda_matrix, theta_index
from .satterthwaite import satterthwaite_df


@dataclass
class Assembled:
    """Everything a fit says about the model (run statistics -- rounds, bytes, time -- are kept apart)."""

    formula: str
    family: Family
    method: str
    nagq: int
    reml: bool
    fixef: pd.Series
    vcov: pd.DataFrame
    cov_re: pd.DataFrame | dict | None   # covariance of the random effects (data scale); by factor if several
    residual_sd: float | None
    loglik: float
    n_params: int
    nobs: int
    ngroups: dict
    converged: bool
    group_name: str | None = None
    modes: pd.DataFrame | dict | None = None    # conditional modes, one row per group level (by factor)
    condsd: pd.DataFrame | dict | None = None   # their conditional standard deviations
    theta: np.ndarray | None = None
    spec: ModelSpec | None = None
    schema: Schema | None = None
    messages: list = field(default_factory=list)
    df_satterthwaite: pd.Series | None = None   # gaussian: Satterthwaite df of each fixed effect
    level_sites: pd.Series | None = None        # the site of each group level
    design_moments: dict | None = None          # pooled n, column sums, XᵀX and ZᵀZ (user scale)
    trace: list = field(default_factory=list)   # per Newton round: round, objective, Newton decrement
    dispersion: dict | None = None              # negative binomial {"theta", "se"}, Gamma {"sigma", "se"}


def method_name(family: Family, options: FitOptions, q: int) -> str:
    if family.name == "gaussian":
        return "REML" if options.reml else "ML"
    return "GLM" if not q else ("Laplace" if options.nagq == 1 else f"AGHQ({options.nagq})")


def _random_effects(st: Setup, est: Estimate, messages: list):
    """θ on the user's scale, the random-effect covariance and the conditional modes (NaN for groups a
    site withheld), ordered by group level."""
    mask, zs, znames, q = st.mask, st.zs, st.znames, st.mask.shape[0]
    r_idx, c_idx = theta_index(mask)
    theta = np.asarray(est.theta) / zs[r_idx]                            # Λ = diag(zs)⁻¹ Λ̃
    lam = lambda_matrix(theta, q, (r_idx, c_idx))
    scale2 = est.sigma2 if est.sigma2 is not None else 1.0
    cov_re = pd.DataFrame(scale2 * lam @ lam.T, index=znames, columns=znames)
    final = est.final
    # a site may withhold the modes of its small groups (its min_group rule): they are NaN here
    withheld = [lv for r in final.values() for lv in r.get("withheld", [])]
    levels = [lv for r in final.values() for lv in r["levels"]] + withheld
    gap = np.full((len(withheld), q), np.nan)
    modes = pd.DataFrame(np.vstack([_at_estimate(r, "modes", q, est.step) for r in final.values()] + [gap]) / zs,
                         index=levels, columns=znames)
    condsd = pd.DataFrame(np.vstack([_at_estimate(r, "condsd", q, est.step) for r in final.values()] + [gap])
                          / zs, index=levels, columns=znames)
    if withheld:
        messages.append(f"conditional modes withheld by site rules for {len(withheld)} group"
                        f"{'s' if len(withheld) != 1 else ''} (smaller than a site's min_group): "
                        "ranef() shows NaN for them and predict() gives them the population-level "
                        "prediction")
    order = natural_order(np.asarray(levels, dtype=str))
    sites = [sid for sid, r in final.items() for _ in r["levels"]] + \
        [sid for sid, r in final.items() for _ in r.get("withheld", [])]
    where = pd.Series(sites, index=levels, dtype=object).iloc[order]
    return theta, cov_re, modes.iloc[order], condsd.iloc[order], where


def _factor_effects(st: Setup, est: Estimate, messages: list):
    """:func:`_random_effects` with several grouping factors: θ, and the covariance, modes and SDs of
    each factor (dictionaries by factor name)."""
    mask, zs, q = st.mask, st.zs, st.mask.shape[0]
    r_idx, c_idx = theta_index(mask)
    theta = np.asarray(est.theta) / zs[r_idx]
    lam = lambda_matrix(theta, q, (r_idx, c_idx))
    scale2 = est.sigma2 if est.sigma2 is not None else 1.0
    final = est.final
    cov_re, modes, condsd, nwithheld = {}, {}, {}, 0
    for g, c in st.factor_columns().items():
        names = [st.znames[j] for j in c]
        lg = lam[np.ix_(c, c)]
        cov_re[g] = pd.DataFrame(scale2 * lg @ lg.T, index=names, columns=names)
        withheld = [lv for r in final.values() for lv in r.get("withheld", {}).get(g, [])]
        nwithheld += len(withheld)
        levels = [lv for r in final.values() for lv in r["levels"][g]] + withheld
        gap = np.full((len(withheld), len(c)), np.nan)
        order = natural_order(np.asarray(levels, dtype=str))
        for out, key in ((modes, "modes"), (condsd, "condsd")):
            vals = np.vstack([_at_estimate(r, key, len(c), est.step, g) for r in final.values()] + [gap]) / zs[c]
            out[g] = pd.DataFrame(vals, index=levels, columns=names).iloc[order]
    if nwithheld:
        messages.append(f"conditional modes withheld by site rules for {nwithheld} group"
                        f"{'s' if nwithheld != 1 else ''} (levels smaller than a site's min_group): ranef() "
                        "shows NaN for them and predict() leaves their effects out")
    return theta, cov_re, modes, condsd


POISSON_LIMIT = np.log(1e6)     # ψ = log ϑ beyond which the negative binomial is the poisson model


def runaway_message(est: Estimate, st: Setup, group: str | None) -> str | None:
    """"not converged: ..." naming the coefficients or variances that run off (:mod:`~fedglmm.likelihood.runaway`),
    or None."""
    if est.info is None:
        return None
    p = len(st.names)
    idx = runaway(est.path, np.r_[est.gamma, est.theta, est.disp], est.info, p, diagonal_positions(st.mask),
                  st.names.index("Intercept") if "Intercept" in st.names else None)
    # a dispersion growing without bound is the family's boundary (negative binomial: the poisson limit)
    idx = idx[idx < p + len(est.theta)]
    r_idx, c_idx = theta_index(st.mask)
    # a covariance (off the diagonal of Λ) counts only if its effect's variance grows with it
    keep = [i for i in idx if i < p or r_idx[i - p] == c_idx[i - p] or _variance_grows(est, p, r_idx, r_idx[i - p])]
    idx = np.array(keep, dtype=np.int64)
    if not len(idx):
        return None
    factor = {int(j): g for g, cols in st.factor_columns().items() for j in cols} \
        if getattr(st, "factor_groups", None) else {}
    fixed = [f"'{st.names[i]}'" for i in idx if i < p]
    random = [f"the {'standard deviation' if r_idx[i - p] == c_idx[i - p] else 'covariance'} of "
              f"'{st.znames[r_idx[i - p]]}'" + ("" if r_idx[i - p] == c_idx[i - p] else
                                                f" and '{st.znames[c_idx[i - p]]}'")
              + f" | {factor.get(int(r_idx[i - p]), group)}" for i in idx if i >= p]
    what = []
    if fixed:
        many = len(fixed) > 1
        what.append(f"the estimate{'s' if many else ''} of {', '.join(fixed)} grow{'' if many else 's'} without "
                    "bound while the log-likelihood flattens (complete or quasi-complete separation: some "
                    "outcome class is predicted perfectly)")
    if random:
        what.append(f"{', '.join(random)} grow{'' if len(random) > 1 else 's'} without bound")
    return "not converged: " + "; ".join(what)


def _variance_grows(est: Estimate, p: int, r_idx, row: int) -> bool:
    """Whether the variance of random effect ``row`` (the squared norm of its row of Λ) grew by more than 1 %
    over the last move of the iteration: a covariance that runs off does; a correlation drifting along a flat
    ridge at constant variances (an intercept variance at zero, its correlation with a slope undetermined: a
    singular fit, not a runaway) does not."""
    if est.path is None:
        return True
    rows = np.flatnonzero(np.asarray(r_idx) == row)
    before = float(np.sum(np.asarray(est.path[0], float)[p + rows] ** 2))
    after = float(np.sum(np.asarray(est.theta, float)[rows] ** 2))
    return after > 1.01 * before


def _at_estimate(reply: dict, key: str, q: int, step, factor: str | None = None) -> np.ndarray:
    """A site's conditional modes (or SDs) at the point of the final sums, moved to the estimate to first
    order when the site sent their derivatives (``d`` + key, (G, q, P)); ``factor``: those of one grouping
    factor (the reply's values are dictionaries by factor)."""
    vals, deriv = reply[key], reply.get("d" + key)
    if factor is not None:
        vals, deriv = vals[factor], None if deriv is None else deriv.get(factor)
    vals = np.reshape(np.asarray(vals, float), (-1, q))
    if deriv is None or step is None or not len(vals):
        return vals
    deriv = np.asarray(deriv, float)
    return vals + deriv.reshape(len(vals), q, -1) @ np.asarray(step, float)


def assemble(formula: str, family: Family, options: FitOptions, spec: ModelSpec, schema: Schema, st: Setup,
             est: Estimate, method: str | None = None) -> Assembled:
    """The fit on the user's scale (β = Aγ, Cov(β) = A Cov(γ) Aᵀ) from the estimate on the internal scale."""
    names, mask, A = st.names, st.mask, st.A
    p, q = len(names), mask.shape[0]
    beta = A @ est.gamma
    vcov = A @ est.vcov_gamma @ A.T
    group = spec.group
    messages = list(est.messages)
    cov_re = modes = condsd = where = None
    theta = np.asarray(est.theta)
    if q and np.min(np.abs(theta[diagonal_positions(mask)])) < 1e-4:
        messages.append("boundary (singular) fit: the random-effect covariance is singular (a standard "
                        "deviation at zero or a correlation of ±1)")
    if q:
        if st.factor_groups:
            theta, cov_re, modes, condsd = _factor_effects(st, est, messages)
        else:
            theta, cov_re, modes, condsd, where = _random_effects(st, est, messages)
    if family.name == "negative_binomial" and len(est.disp) and est.disp[0] > POISSON_LIMIT:
        messages.append(f"theta = {np.exp(est.disp[0]):.3g} is at the poisson limit: the data show no "
                        "overdispersion beyond the poisson's (a poisson fit has the same estimates and logLik)")
    if st.shared:
        messages.append(shared_note(st))
    converged = bool(est.converged)
    gone = runaway_message(est, st, group)
    if gone:
        converged = False
        messages.insert(0, gone)
    elif not converged:        # (the rounds ended where the estimates ran off: the check at the end may differ)
        messages.insert(0, "not converged: the estimates kept moving along a direction the data do not bound "
                           "(separation, or a variance without bound)")
    method = method or method_name(family, options, q)
    if options.penalty:
        method += f", L2 penalty {options.penalty:g}"
        messages.append(f"estimates maximise logLik − {options.penalty:g}·‖β‖² (intercept not penalised); "
                        "logLik is reported without the penalty, standard errors from the penalised "
                        "information")
    gaussian = family.name == "gaussian"
    return Assembled(
        formula=formula, family=family, method=method, nagq=options.nagq, reml=bool(options.reml and gaussian),
        fixef=pd.Series(beta, index=names), vcov=pd.DataFrame(vcov, index=names, columns=names), cov_re=cov_re,
        residual_sd=float(np.sqrt(est.sigma2)) if gaussian else None, loglik=float(est.loglik),
        n_params=p + int(mask.sum()) + (1 if gaussian else 0) + family.ndisp, nobs=st.n,
        ngroups=dict(st.factor_groups) if st.factor_groups else {group: st.ngroups} if group else {},
        converged=converged, group_name=group,
        modes=modes, condsd=condsd, theta=theta, spec=spec, schema=schema, messages=messages,
        df_satterthwaite=_satterthwaite(st, est, options) if gaussian else None, level_sites=where,
        trace=[{"round": int(r), "objective": f, "decrement": d} for r, f, d in est.trace],
        design_moments={"n": st.n, **{k: np.asarray(st.sums[k], float) for k in ("colsum", "xtx", "ztz")
                                      if k in st.sums}},
        dispersion=_dispersion(family, est))


def _dispersion(family: Family, est: Estimate) -> dict | None:
    """The dispersion parameter as glmmTMB reports it (negative binomial ϑ = e^ψ; Gamma σ = e^{−ψ/2}, the
    coefficient of variation), with its standard error by the delta method from that of ψ."""
    if not family.ndisp:
        return None
    psi = float(est.disp[0])
    var = float(est.vcov_disp[0, 0]) if est.vcov_disp is not None and est.vcov_disp.size else float("nan")
    return {family.dispersion_name: family.dispersion(psi),
            "se": abs(family.dispersion_slope(psi)) * float(np.sqrt(var)) if var >= 0 else float("nan")}


ROUNDS_NOTE = "fitted exactly: each site sent sums over its rows for the shared levels' block, the coordinator " \
    "solved for their effects"


def shared_note(st: Setup, how: str = ROUNDS_NOTE) -> str:
    """Which grouping factors have levels at several sites, and how many, and (``how``) how they were fitted."""
    parts = []
    for f, levels in st.shared.items():
        nsites = list(levels.values())
        span = f"{min(nsites)}" if min(nsites) == max(nsites) else f"{min(nsites)}-{max(nsites)}"
        parts.append(f"{f}: {len(levels)} of {st.factor_groups.get(f, len(levels))} levels at {span} sites each")
    return "levels shared by sites (" + "; ".join(parts) + "), " + how


def _satterthwaite(st: Setup, est: Estimate, options: FitOptions) -> pd.Series | None:
    """The Satterthwaite df of each fixed effect from the sums of the final round (none if a part did not
    send its θ-derivatives)."""
    keys = LMM_KEYS + (LMM_DERIVATIVE_KEYS if st.mask.sum() else [])
    # with shared levels the pooled sums come as one part (the sites' parts carry their modes only)
    parts = {k: r for k, r in est.final.items() if not st.shared or "A" in r}
    if not all(k in r for r in parts.values() for k in keys):
        return None
    df = satterthwaite_df(sum_replies(parts, keys), options.reml, st.A)
    return pd.Series(df, index=st.names, name="df")
