"""A site's own fit of its rows: the estimate and its information that a site withholding small groups'
summaries sends in their stead, for the hybrid's start.

The site fits its own rows as a whole federation of one would -- the same set-up sums, internal scale,
starting values and Newton iteration (:mod:`fedglmm.likelihood.fit`) -- with its engine evaluated in
place: no transport and no coordinator.
"""
from __future__ import annotations

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


def own_fit(frame, d: Design, sizes, spec: ModelSpec, fam: Family, local: dict, site_id: str, need,
            transforms: dict | None = None, coded: bool = False) -> dict | None:
    """The site's own GLMM fit of all its rows: β̂, θ̂ and their information, sums over many rows and
    groups.  Sent only for at least two groups and ``need`` observations, with at least three
    observations per parameter (as the site rules' 0.33 parameters per row).

    The site's own coding of a factor need not be the agreed one, so a model with factor columns gets no
    own fit -- unless ``coded`` (families without one-shot summaries, for which the own fit is the start):
    then the fit is sent as information sums in the coding of ``d`` (:func:`_in_design_coding`), which
    the coordinator maps to the agreed design by column name, as it maps the one-shot sums."""
    npar = d.X.shape[1] + int(np.asarray(d.theta_mask).sum()) + fam.ndisp
    total = float(sizes.sum())
    factors = any("[" in nm for nm in d.x_names)
    if (factors and not coded) or any("[" in nm for nm in d.z_names) or len(sizes) < 2 \
            or total < max(need, 3.0 * npar):
        return None
    options = FitOptions(nagq=int(local.get("nagq", 1)), curvature=str(local.get("curvature", "observed")))
    res = local_fit(frame, spec, fam, options, site_id, transforms)
    if res is None:
        return None
    if factors:
        return _in_design_coding(res, d, fam, total, len(sizes))
    if res["names"] != list(d.x_names):
        return None
    return {"beta": res["beta"], "theta": res["theta"], "info": res["info"], "n": total, "ngroups": len(sizes)}


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


def _in_design_coding(res: dict, d: Design, fam: Family, total: float, ngroups: int) -> dict | None:
    """An own fit in the coding of ``d`` (a column for every level the site has): with X_d = X_own K (every
    column of d's design is a combination of the own fit's columns), the marginal information of β in
    that coding is Kᵀ I K and its product with the estimate Kᵀ I β̂ -- sums over rows that the coordinator
    maps to any coding whose columns are among d's, and adds over sites (the information-weighted
    combination of the sites' estimates).  θ and ψ do not depend on the coding of X."""
    K, *_ = np.linalg.lstsq(res["X"], d.X, rcond=None)
    if np.max(np.abs(res["X"] @ K - d.X)) > 1e-8 * max(1.0, float(np.max(np.abs(d.X)))):
        return None
    p = len(res["beta"])
    try:
        cov = np.linalg.inv(res["info"])
        info_b = np.linalg.inv(cov[:p, :p])
    except np.linalg.LinAlgError:
        return None
    out = {"xinfo": K.T @ info_b @ K, "xinfo_b": K.T @ info_b @ res["beta"], "theta": res["theta"],
           "n": total, "ngroups": ngroups}
    if fam.ndisp:
        out["disp_var"] = float(cov[-1, -1])
    return out


def local_fit(frame, spec: ModelSpec, family: Family, options: FitOptions, site_id: str,
              transforms: dict | None = None) -> dict | None:
    """A fit of ``frame`` alone, as an estimate and its information on the user's scale: β, θ (followed by
    the log-dispersion ψ for a family with one) and the information matrix of (β, θ, ψ) (gaussian: None);
    and the fit's design matrix X.  None when the fit fails or does not converge."""
    try:
        desc = describe_frame(frame, spec, site_id)
        schema = Schema(kinds={c: desc["columns"][c] for c in variables(spec)}, levels=dict(desc["levels"]),
                        transforms=dict(transforms or {}))
        design = build_design(spec, schema, frame, family, site_id, checked=True)
        st = make_setup({site_id: setup_reply(design, family)}, family.ndisp)
        engine = make_engine(design, family, options.nagq, options.curvature, st.A, st.zs)
        evaluator = LocalEvaluator({site_id: engine}, {site_id: None if design.factors or not design.Z.shape[1]
                                                       else design.group_levels})
        est = fit_lmm(evaluator, st, options) if family.name == "gaussian" else \
            fit_glmm(evaluator, st, *start_values(st, family), options)
    except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
        return None
    if not est.converged or (est.info is None and family.name != "gaussian"):
        return None
    out = {"names": list(st.names), "z_names": list(st.znames), "beta": st.A @ est.gamma,
           "theta": np.r_[est.theta / st.theta_scale, est.disp], "info": None, "X": design.X}
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
    if family.name == "gaussian":
        return local_fit(frame, spec, family, FitOptions(newton=NewtonConfig(tol=1e-4, near=1e-2)), site_id,
                         transforms)
    try:
        desc = describe_frame(frame, spec, site_id)
        schema = Schema(kinds={c: desc["columns"][c] for c in variables(spec)}, levels=dict(desc["levels"]),
                        transforms=dict(transforms or {}))
        design = build_design(spec, schema, frame, family, site_id, checked=True)
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
