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
from ..likelihood.fit import LocalEvaluator, fit_glmm
from ..likelihood.setup import make_setup, setup_reply
from ..likelihood.starts import start_values
from ..model.design import build_design, describe_frame
from ..model.families import Family
from ..model.formula import variables
from ..model.options import FitOptions
from ..model.spec import Design, ModelSpec, Schema


def own_fit(frame, d: Design, sizes, spec: ModelSpec, fam: Family, local: dict, site_id: str, need,
            transforms: dict | None = None) -> dict | None:
    """The site's own GLMM fit of all its rows: β̂, θ̂ and their information, sums over many rows and
    groups.  Sent only for at least two groups and ``need`` observations, with at least three
    observations per parameter (as the site rules' 0.33 parameters per row); not for models with factor
    columns (the site's own coding of a factor need not be the agreed one)."""
    npar = d.X.shape[1] + int(np.asarray(d.theta_mask).sum())
    total = float(sizes.sum())
    if any("[" in nm for nm in d.x_names) or len(sizes) < 2 or total < max(need, 3.0 * npar):
        return None
    options = FitOptions(nagq=int(local.get("nagq", 1)), curvature=str(local.get("curvature", "observed")))
    res = local_fit(frame, spec, fam, options, site_id, transforms)
    if res is None or res["names"] != list(d.x_names):
        return None
    return {"beta": res["beta"], "theta": res["theta"], "info": res["info"], "n": total, "ngroups": len(sizes)}


def local_fit(frame, spec: ModelSpec, family: Family, options: FitOptions, site_id: str,
              transforms: dict | None = None) -> dict | None:
    """A fit of ``frame`` alone, as an estimate and its information on the user's scale: β, θ and the
    information matrix of (β, θ).  None when the fit fails or does not converge."""
    try:
        desc = describe_frame(frame, spec, site_id)
        schema = Schema(kinds={c: desc["columns"][c] for c in variables(spec)}, levels=dict(desc["levels"]),
                        transforms=dict(transforms or {}))
        design = build_design(spec, schema, frame, family, site_id, checked=True)
        st = make_setup({site_id: setup_reply(design, family)})
        engine = make_engine(design, family, options.nagq, options.curvature, st.A, st.zs)
        evaluator = LocalEvaluator({site_id: engine}, {site_id: design.group_levels if design.Z.shape[1] else None})
        est = fit_glmm(evaluator, st, *start_values(st, family), options)
    except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
        return None
    if not est.converged or est.info is None:
        return None
    T = st.internal_transform()
    return {"names": list(st.names), "beta": st.A @ est.gamma, "theta": est.theta / st.theta_scale,
            "info": T.T @ est.info @ T}
