"""A site's own fit of its rows: the estimate and its information that a site sends with its one-shot
summaries, for the hybrid's start.

The site fits its own rows as a whole federation of one would -- the same set-up sums, internal scale,
starting values and Newton iteration (:mod:`fedglmm.likelihood.fit`) -- with its engine evaluated in
place: no transport and no coordinator.

The site does not know the other sites' factor levels, so it fits in its own coding: each factor against
its own first level (the agreed reference whenever the site has it: levels are sorted the same way
everywhere), less any column that depends on the ones before it (a covariate constant at this site).  Its
columns are named as in its one-shot design (where every level it has is a column), and the coordinator
maps them by name to the agreed design through the site's cross-products ``XᵀX`` of the same message
(:func:`fedglmm.coordinator.starts.own_part`).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import FedGLMMError
from ..likelihood.engine import make_engine
from ..likelihood.fit import LocalEvaluator, canonical_theta, fit_glmm, fit_lmm
from ..likelihood.newton import TrustRegionNewton
from ..likelihood.setup import make_setup, setup_reply
from ..likelihood.starts import start_values
from ..model.design import build_design, describe_frame
from ..model.families import Family
from ..model.formula import variables
from ..model.options import FitOptions, NewtonConfig
from ..model.spec import Design, ModelSpec, Schema


def _site_design(frame, spec: ModelSpec, fam: Family, site_id: str, transforms: dict | None) -> Design:
    """The site's design of its rows in its own coding (each factor against its own first level)."""
    desc = describe_frame(frame, spec, site_id)
    schema = Schema(kinds={c: desc["columns"][c] for c in variables(spec)}, levels=dict(desc["levels"]),
                    transforms=dict(transforms or {}))
    return build_design(spec, schema, frame, fam, site_id, checked=True)


def own_fit(frame, spec: ModelSpec, fam: Family, sizes, local: dict, site_id: str, need,
            transforms: dict | None = None) -> dict | None:
    """The site's own GLMM fit of all its rows: β̂ of the columns ``names``, θ̂ (and ψ̂) and the information
    of (β, θ, ψ), sums over many rows and groups.  Sent only for at least two groups and ``need`` observations,
    with at least three observations per parameter (as the site rules' 0.33 parameters per row).
    ``transforms``: the pooled statistics of stateful transforms (center(x), poly(x, k), ...), as agreed."""
    try:
        d = _site_design(frame, spec, fam, site_id, transforms)
    except FedGLMMError:
        return None
    keep = independent_columns(d.X)
    npar = len(keep) + int(np.asarray(d.theta_mask).sum()) + fam.ndisp
    total = float(np.sum(sizes))
    if (d.Z.shape[1] and len(sizes) < 2) or total < max(need, 3.0 * npar):
        return None
    # a start for a fit with other sites needs no more than a decrement of 1e-4 (a hundredth of a standard
    # error); the fit of the only site is the fit itself
    newton = NewtonConfig() if local.get("exact") else NewtonConfig(tol=1e-4, near=1e-2)
    options = FitOptions(nagq=int(local.get("nagq", 1)), curvature=str(local.get("curvature", "observed")),
                         newton=newton)
    sub = replace(d, X=d.X[:, keep], x_names=[d.x_names[j] for j in keep])
    res = local_fit(sub, fam, options, site_id, starts=[])
    if res is None or res["info"] is None:
        return None
    return {"names": res["names"], "z_names": list(d.z_names), "beta": res["beta"], "theta": res["theta"],
            "info": res["info"], "n": total, "ngroups": len(sizes) if d.Z.shape[1] else 0}


def independent_columns(X: np.ndarray, tol: float = 1e-9) -> list[int]:
    """Indices of the columns of ``X`` that do not depend on the ones before them (in order): a Cholesky
    of the correlation-scaled cross-products, skipping a column whose residual variance is below ``tol``."""
    G = X.T @ X
    s = np.sqrt(np.where(np.diag(G) > 0, np.diag(G), 1.0))
    G = G / np.outer(s, s)
    keep: list[int] = []
    for j in range(G.shape[0]):
        if G[j, j] <= 0:
            continue
        if keep:
            K = np.asarray(keep)
            r = G[j, j] - G[j, K] @ np.linalg.lstsq(G[np.ix_(K, K)], G[K, j], rcond=None)[0]
        else:
            r = G[j, j]
        if r > tol:
            keep.append(j)
    return keep


def own_factor_fit(frame, d: Design, spec: ModelSpec, fam: Family, local: dict, site_id: str,
                   transforms: dict | None = None) -> dict | None:
    """With several grouping factors: the site's own fit of its rows -- β, θ (and ψ) and their information,
    with the number of levels of each factor behind them and the column names of the site's own coding
    (the coordinator uses what is coded as in the agreed design), sums over many rows and levels -- for
    the hybrid's start.  Sent with at least two levels of every factor and three observations per
    parameter, whatever the sizes of the groups."""
    npar = d.X.shape[1] + int(np.asarray(d.theta_mask).sum()) + fam.ndisp
    levels = {f.name: len(f.levels) for f in d.factors}
    if min(levels.values()) < 2 or d.n < 3.0 * npar:
        return None
    res = short_fit(frame, spec, fam, str(local.get("curvature", "observed")), site_id, transforms)
    if res is None:
        return None
    out = {"names": res["names"], "z_names": res["z_names"], "beta": res["beta"], "theta": res["theta"],
           "levels": levels, "n": float(d.n)}
    if res["info"] is not None:
        out["info"] = res["info"]
    return out


def local_fit(design: Design, family: Family, options: FitOptions, site_id: str, starts=None) -> dict | None:
    """A fit of ``design`` alone, as an estimate and its information on the user's scale: β, θ (followed by
    the log-dispersion ψ for a family with one) and the information matrix of (β, θ, ψ) (gaussian: None).  ``starts``: the GLMM iteration's further first-round
    points (default: the start's covariance halved and doubled).  None when the fit fails or does not
    converge."""
    try:
        st = make_setup({site_id: setup_reply(design, family)}, family.ndisp)
        engine = make_engine(design, family, options.nagq, options.curvature, st.A, st.zs)
        evaluator = LocalEvaluator({site_id: engine}, {site_id: None if design.factors or not design.Z.shape[1]
                                                       else design.group_levels})
        est = fit_lmm(evaluator, st, options) if family.name == "gaussian" else \
            fit_glmm(evaluator, st, *start_values(st, family), options, starts=starts)
    except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
        return None
    if not est.converged or (est.info is None and family.name != "gaussian"):
        return None
    out = {"names": list(st.names), "z_names": list(st.znames), "beta": st.A @ est.gamma,
           "theta": np.r_[est.theta / st.theta_scale, est.disp], "info": None}
    if est.info is not None:
        T = st.internal_transform()
        out["info"] = T.T @ est.info @ T
    return out


SHORT_ROUNDS = 4      # local Newton iterations of a site's own fit with several factors: it is only a start


def short_fit(frame, spec: ModelSpec, family: Family, curvature: str, site_id: str,
              transforms: dict | None = None) -> dict | None:
    """A site's own fit of its rows, cut short: at most ``SHORT_ROUNDS`` local Newton iterations from the
    site-totals start (the point reached is a start for the federated rounds, which finish the job), as
    β, θ (and ψ) and the information at that point on the user's scale (gaussian: no information, β
    profiled)."""
    try:
        design = _site_design(frame, spec, family, site_id, transforms)
        if family.name == "gaussian":
            return local_fit(design, family, FitOptions(newton=NewtonConfig(tol=1e-4, near=1e-2)), site_id)
        st = make_setup({site_id: setup_reply(design, family)}, family.ndisp)
        engine = make_engine(design, family, 1, curvature, st.A, st.zs)
        opt = TrustRegionNewton(np.concatenate(start_values(st, family)),
                                NewtonConfig(tol=1e-4, near=1e-2, max_evals=SHORT_ROUNDS, single=True),
                                predict_final=True)
        xs = opt.starts
        while xs:
            sums = [engine.sums(x) for x in xs]
            xs = opt.tell(xs, [(-r["value"], -r["grad"], -r["hess"]) for r in sums])
    except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
        return None
    cur = opt.current
    if cur is None or not np.all(np.isfinite(cur.H)):
        return None
    x = opt.solution if opt.converged else cur.x
    p, T = len(st.names), st.internal_transform()
    k = p + int(st.mask.sum())
    return {"names": list(st.names), "z_names": list(st.znames), "beta": st.A @ x[:p],
            "theta": np.r_[canonical_theta(x[p:k], st.mask) / st.theta_scale, x[k:]], "info": T.T @ cur.H @ T}
