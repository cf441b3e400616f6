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
from ..likelihood.linalg import transform_third
from ..likelihood.newton import TrustRegionNewton
from ..likelihood.runaway import ran_off
from ..likelihood.setup import make_setup, setup_reply
from ..likelihood.starts import start_values
from ..model.design import build_design, coding_key, describe_frame
from ..model.families import Family
from ..model.formula import variables
from ..model.options import CUT_SHORT_GROUPS, MIN_GROUP, OWN_FIT_GROUPS, FitOptions, NewtonConfig
from ..model.recode import own_design
from ..model.spec import Design, ModelSpec, Schema, lambda_matrix, theta_index
from .own_third import covariance_third, third_derivatives
from .own_modes import big_levels, factor_modes
from .warm import slope_of


def _site_design(frame, spec: ModelSpec, fam: Family, site_id: str, transforms: dict | None,
                 desc: dict | None = None) -> Design:
    """The site's design of its rows in its own coding (each factor against its own first level); ``desc``:
    :func:`describe_frame` of these rows, if the caller has it already."""
    return build_design(spec, _site_schema(frame, spec, site_id, transforms, desc), frame, fam, site_id, checked=True)


def _site_schema(frame, spec: ModelSpec, site_id: str, transforms: dict | None, desc: dict | None) -> Schema:
    desc = describe_frame(frame, spec, site_id) if desc is None else desc
    return Schema(kinds={c: desc["columns"][c] for c in variables(spec)}, levels=dict(desc["levels"]),
                  transforms=dict(transforms or {}))


# A site with CUT_SHORT_GROUPS groups or more (model.options) stops its own fit at a Newton decrement below
# MANY_TOL, plus its Newton step (whose error is of the order of the square of that, times a contraction of
# about 1e-3 with a thousand groups): two evaluations earlier than at 1e-4, with an error well below the
# spread of the sites' estimates that the combination carries anyway; below OWN_FIT_GROUPS groups (and no bounded
MANY_TOL = 0.5    # link) with its third derivatives along θ (methods.hybrid_gates._fits_suffice)
# ... and starts from the moment estimate of Σ with each SD at least MANY_FLOOR on the internal scale (the
# coordinator's starts keep 0.5: a start near θ = 0, a saddle, wastes its rounds).  With 100 groups or more the
# estimate is sound, and the floor of 0.5 held a slope's SD of 0.33 at 0.49: 1e6 rows over 100 sites of 100
# groups, the own fits' evaluations 3.65 -> 3.0 per site (none rejected); over 10 sites 4.0 -> 3.2; 72 simulated
# sites of 100-1000 groups (benchmarks/own_fit_evals.py) 402 -> 351 (0.1: 385, an SD near 0 starts near the saddle)
MANY_FLOOR = 0.25


def own_fit(frame, spec: ModelSpec, fam: Family, sizes, local: dict, site_id: str, need,
            transforms: dict | None = None, third: bool = True, desc: dict | None = None,
            oneshot: tuple | None = None, sums: dict | None = None) -> dict | None:
    """The site's own GLMM fit of all its rows: β̂ of the columns ``names``, θ̂ (and ψ̂) and the information
    of (β, θ, ψ), sums over many rows and groups.  Sent only for at least two groups and ``need`` observations,
    with at least three observations per parameter (as the site rules' 0.33 parameters per row).
    ``transforms``: the pooled statistics of stateful transforms (center(x), poly(x, k), ...), as agreed;
    ``third``: also the third derivatives (with fewer than ``CUT_SHORT_GROUPS`` groups); ``desc``: the frame's
    description, and ``oneshot`` its one-shot design, the model specs of its build and its reference level,
    if at hand (the own coding's design is read off them where it can be: :func:`fedglmm.model.recode.own_design`);
    ``sums``: the one-shot message's set-up sums of that design, which the fit's set-up takes where its
    columns are the one-shot design's (:func:`_same_setup`)."""
    try:
        schema = _site_schema(frame, spec, site_id, transforms, desc)
        d = own_design(*oneshot) if oneshot is not None else None
        read_off = d is not None
        d = d if read_off else build_design(spec, schema, frame, fam, site_id, checked=True)
    except FedGLMMError:
        return None
    keep = independent_columns(d.X)
    npar = len(keep) + int(np.asarray(d.theta_mask).sum()) + fam.ndisp
    total = float(np.sum(sizes))
    if (d.Z.shape[1] and len(sizes) < 2) or total < max(need, 3.0 * npar):
        return None
    # a start for a fit with other sites needs no more than a decrement of 1e-4 (a hundredth of a standard
    # error); the fit of the only site is the fit itself
    many = len(sizes) >= CUT_SHORT_GROUPS and not local.get("exact") and not d.factors
    newton = NewtonConfig() if local.get("exact") else NewtonConfig(tol=1e-4, near=1e-2)
    nagq, curvature = int(local.get("nagq", 1)), str(local.get("curvature", "observed"))
    options = FitOptions(nagq=nagq, curvature=curvature, newton=newton)
    sub = replace(d, X=d.X[:, keep], x_names=[d.x_names[j] for j in keep])
    reply = _same_setup(sub, oneshot[0], sums) if read_off and sums is not None else None
    if many:
        try:
            res = _cut_short(sub, fam, nagq, curvature, site_id, 60, MANY_TOL, reply,
                             third=len(sizes) < OWN_FIT_GROUPS and not fam.positive_eta)
        except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
            res = None
    else:
        res = local_fit(sub, fam, options, site_id, starts=[], third=third and not local.get("exact"), reply=reply,
                        covariance=bool(local.get("exact")), exact=bool(local.get("exact")))
    if res is None or (res["info"] is None and fam.name != "gaussian"):
        return None
    out = {"names": res["names"], "z_names": list(d.z_names), "beta": res["beta"], "theta": res["theta"],
           "info": res["info"], "n": total, "ngroups": len(sizes) if d.Z.shape[1] else 0}
    if res.get("third") is not None:
        out["third"] = res["third"]
    if res.get("modes") is not None:
        out[KEPT] = (list(d.group_levels), res["modes"], res.get("slope"))     # (slope: see site.warm)
    out[KEPT_DESIGN] = (frame, coding_key(spec, schema, fam), d)
    return out


def kept_design(frame, spec: ModelSpec, fam: Family, site_id: str, transforms: dict | None, desc: dict,
                oneshot: tuple) -> tuple | None:
    """What :data:`KEPT_DESIGN` holds where the site does not fit its own rows: its design in its own coding,
    read off the one-shot design (None where it cannot be; the set-up then builds its design)."""
    try:
        d = own_design(*oneshot)
        return None if d is None else (frame, coding_key(spec, _site_schema(frame, spec, site_id, transforms, desc),
                                                          fam), d)
    except FedGLMMError:
        return None


def _same_setup(sub: Design, oneshot: Design, sums: dict) -> dict | None:
    """The set-up reply of ``sub`` (:func:`~fedglmm.likelihood.setup.setup_reply`) from the one-shot sums of
    the design it was read off, where its columns are all of that design's, in order (a site without factor
    columns, or with every level of each: the sums are then the same, and not made twice); else None."""
    if list(sub.x_names) != list(oneshot.x_names) or sub.X.shape != oneshot.X.shape or sub.factors:
        return None
    return {"n": sub.n, "ngroups": len(sub.group_levels) if sub.Z.shape[1] else 0, "x_names": list(sub.x_names),
            "z_names": list(sub.z_names), "theta_mask": np.asarray(sub.theta_mask), **sums}


KEPT = "kept at the site"     # the own fit's modes: the site keeps them (never sent) to start its engine from
# and its design (with the rows and the coding it was built for): the set-up's design where the codings agree
KEPT_DESIGN = "design kept at the site"


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
                   transforms: dict | None = None, min_group: float = MIN_GROUP, modes: bool = False) -> dict | None:
    """With several grouping factors: the site's own fit of its rows -- β, θ (and ψ) and their information,
    with the number of levels of each factor behind them and the column names of the site's own coding
    (the coordinator uses what is coded as in the agreed design), sums over many rows and levels -- for
    the hybrid's start.  Sent with at least two levels of every factor and three observations per
    parameter, whatever the sizes of the groups.

    A factor of which the site holds one level (its hospital, say, when each hospital is a site) has no
    variance the site can estimate: the site fits the model without that factor's terms (its level's effect
    is then in the intercept) and says so (``alone``: those factors).  θ comes in the full model's layout,
    the left-out factors' entries 0; the information is that of the fit made, over (β, θ of the factors
    kept, ψ).  The coordinator takes the kept factors' covariances from it, and the left-out factor's
    variance from how the sites' intercepts differ (:mod:`fedglmm.coordinator.between`).  A gaussian fit
    (β profiled, no information of θ) sends instead the information of β̂ and σ̂, the variance between
    sites being relative to σ²: with the coordinator's third-order steps, egsingle, chem97 and sim_gauss3
    split one hospital per site take 4 rounds with such fits and 5-7 without (with Newton's steps they had
    helped egsingle and cost chem97 and scotssec rounds).

    Asked to (``modes``), a binomial or poisson fit also sends the conditional modes and SDs, on the
    user's scale, of each factor's levels with at least ``min_group`` observations (the rule for the modes of
    the final round): where levels are shared by sites they start the shared effects
    (:func:`~fedglmm.coordinator.own_combination.shared_level_modes`)."""
    npar = d.X.shape[1] + int(np.asarray(d.theta_mask).sum()) + fam.ndisp
    levels = {f.name: len(f.levels) for f in d.factors}
    alone = [f for f in d.factors if len(f.levels) < 2]
    kept = [f for f in d.factors if len(f.levels) >= 2]
    if not kept or d.n < 3.0 * npar:
        return None
    fit_spec = spec if not alone else replace(spec, random=tuple(t for t in spec.random
                                                                  if t.group not in {f.name for f in alone}))
    res = short_fit(frame, fit_spec, fam, str(local.get("curvature", "observed")), site_id, transforms,
                    exact=bool(local.get("exact")) and not alone, reml=bool(local.get("reml", True)),
                    rounds=ALONE_ROUNDS if alone else SHORT_ROUNDS, stop=0.0 if alone else SHORT_STOP, third=not alone,
                    modes=fam.name != "gaussian" and modes)
    if res is None:
        return None
    theta = res["theta"] if not alone else _in_full_layout(res, d, kept)
    if theta is None:
        return None
    # (the fit's own Z columns: a factor in a random term, (1 + Gender | item), has every level a column in
    # the one-shot design d; verbagg_dif's pooled fit went 12 rounds for want of its exact own fit)
    out = {"names": res["names"], "z_names": list(res["z_names"] if not alone else d.z_names), "beta": res["beta"],
           "theta": theta, "levels": levels, "n": float(d.n)}
    if alone:
        out["alone"] = [f.name for f in alone]
    if res.get("factor_modes"):
        out["modes"] = big_levels(res["factor_modes"], min_group)
    if res["info"] is not None:
        out["info"] = res["info"]
        if res.get("third") is not None:          # (the full model's: combined by coordinator.own_combination)
            out["third"] = res["third"]
    elif alone and res.get("vcov_beta") is not None:
        # gaussian: the information of β̂ alone (β profiled), and σ̂ -- the left-out factor's variance between
        # sites, relative to σ² (:func:`~fedglmm.coordinator.own_combination.factor_combined_start`)
        try:
            out["info"], out["sigma"] = np.linalg.inv(res["vcov_beta"]), res["sigma"]
        except np.linalg.LinAlgError:
            pass
    return out


def _in_full_layout(res: dict, d: Design, kept: list):
    """θ (and ψ) of a fit without some factors' terms in the layout of the full design ``d``: the kept
    factors' Λ blocks in their places, the others' 0; None where the fit's Z columns are not those."""
    cols = np.sort(np.concatenate([np.asarray(f.columns, int) for f in kept]))
    if list(res["z_names"]) != [d.z_names[c] for c in cols]:
        return None
    sub = np.asarray(d.theta_mask, bool)[np.ix_(cols, cols)]
    k_sub = int(sub.sum())
    theta = np.asarray(res["theta"], float)
    lam = np.zeros((d.Z.shape[1],) * 2)
    lam[np.ix_(cols, cols)] = lambda_matrix(theta[:k_sub], len(cols), theta_index(sub))
    return np.r_[lam[theta_index(d.theta_mask)], theta[k_sub:]]


def local_fit(design: Design, family: Family, options: FitOptions, site_id: str, starts=None, third: bool = False,
              reply: dict | None = None, covariance: bool = True, exact: bool = False) -> dict | None:
    """A fit of ``design`` alone, as an estimate and its information on the user's scale: β, θ (followed by
    the log-dispersion ψ for a family with one) and the information matrix of (β, θ, ψ) (gaussian: None).
    ``starts``: the GLMM iteration's further first-round points (default: the start's covariance halved and
    doubled); ``third``: also the third derivatives of −ℓ there (:func:`third_derivatives`, user's scale);
    ``reply``: the design's set-up reply, if at hand; ``covariance``: a gaussian fit's steps in Σ's entries
    (:func:`fit_lmm`).  None when the fit fails or does not converge, or (``exact``: the fit itself, of the only
    site) where its estimates run off (:func:`~fedglmm.likelihood.runaway.ran_off`): its local iteration ended
    "converged" as the gain per step fell below the tolerance, and the rounds that follow name what runs off."""
    if family.name != "gaussian":      # (a gaussian fit's few θ steps are as before: see NewtonConfig.local)
        options = replace(options, newton=options.newton.local)
    try:
        st = make_setup({site_id: setup_reply(design, family) if reply is None else reply}, family.ndisp)
        engine = make_engine(design, family, options.nagq, options.curvature, st.A, st.zs)
        evaluator = LocalEvaluator({site_id: engine}, {site_id: None if design.factors or not design.Z.shape[1]
                                                       else design.group_levels})
        est = fit_lmm(evaluator, st, options, covariance=covariance) if family.name == "gaussian" else \
            fit_glmm(evaluator, st, *start_values(st, family), options, starts=starts,
                     poisson_limit=family.name == "negative_binomial")
    except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
        return None
    if not est.converged or (est.info is None and family.name != "gaussian") \
            or exact and ran_off(est, st.names, st.mask):
        return None
    out = {"names": list(st.names), "z_names": list(st.znames), "beta": st.A @ est.gamma,
           "theta": np.r_[est.theta / st.theta_scale, est.disp], "info": None,
           "modes": _modes_of(engine)}
    if family.name == "gaussian":            # (β̂'s covariance and σ̂: a fit without a factor, between sites)
        out.update(vcov_beta=st.A @ est.vcov_gamma @ st.A.T, sigma=float(np.sqrt(est.sigma2)))
    if est.info is not None:
        T = st.internal_transform()
        out["info"] = T.T @ est.info @ T
        x = np.r_[est.gamma, est.theta, est.disp]
        D3 = third_derivatives(engine, x, est.info) if third and family.name != "gaussian" else None
        if D3 is not None:
            out["third"] = transform_third(D3, T)
    return out


THIRD_ROWS = 5_000    # a multi-level site with fewer rows than this: third derivatives along every factor's θ
# Local Newton iterations of a site's own fit with several factors (it is only a start; the iteration also
# ends at a decrement of 1e-4): a fit of the full model, which the coordinator combines by its information
# (:mod:`fedglmm.coordinator.own_combination`), at most SHORT_ROUNDS, ending where its decrement falls below
# SHORT_STOP (at that point plus its Newton step); a fit without a factor the site holds one level of, at most
# ALONE_ROUNDS.  Measured on the GLMM cases of parity_multilevel split over 3 sites (24 splits), rounds in all /
# splits above 4: 4 iterations 134 / 20; 6 127 / 17; 8 129 / 17; 12 128 / 17 (the same with SHORT_STOP 1e-3
# or 0).  12 took bench_multilevel.py from 5 rounds to 4, but made the reference cases grouseticks_nested and
# _olre over 3 sites 13-35 % slower in process (a site whose SD heads to 0 spends all 12); 6 is as fast as 4.
# With 12 for the fits without a factor, the splits of one level per site went 8 -> 6 rounds on arabidopsis_la
# and _olre and 5 -> 4 on sim_nb_nested, but 6 -> 8 on mmmec_olre and 7 -> 8, 5 -> 6 on sim_mc_binary_la,
# _uncorr: no clear gain.
SHORT_ROUNDS = 6
SHORT_STOP = 1e-2
ALONE_ROUNDS = 4


def short_fit(frame, spec: ModelSpec, family: Family, curvature: str, site_id: str,
              transforms: dict | None = None, exact: bool = False, reml: bool = True,
              rounds: int = SHORT_ROUNDS, stop: float = SHORT_STOP, third: bool = False,
              modes: bool = False) -> dict | None:
    """A site's own fit of its rows, cut short: at most ``rounds`` local Newton iterations from the
    site-totals start, ending where the decrement falls below ``stop`` (the point reached is a start for
    the federated rounds, which finish the job), as
    β, θ (and ψ) and the information at that point on the user's scale (gaussian: no information, β
    profiled).  ``exact`` (the only site of a fit): to convergence, at the fit's tolerance (``reml``: a gaussian
    model's criterion); ``third``: a GLMM's third derivatives along its covariance parameters too; ``modes``:
    a GLMM's conditional modes by factor too (``factor_modes``: :func:`_cut_short`)."""
    try:
        design = _site_design(frame, spec, family, site_id, transforms)
        if exact:
            return local_fit(design, family, FitOptions(curvature=curvature, reml=reml), site_id, exact=True)
        keep = independent_columns(design.X)
        if len(keep) < design.X.shape[1]:
            # a column that the others determine here (a hospital's own covariate, constant at its site): left
            # out, its effect in theirs; the coordinator maps the fit through the site's XᵀX (coordinator.between)
            design = replace(design, X=design.X[:, keep], x_names=[design.x_names[j] for j in keep])
        if family.name == "gaussian":
            return local_fit(design, family, FitOptions(reml=reml, newton=NewtonConfig(tol=1e-4, near=1e-2)), site_id,
                             covariance=False)
        return _cut_short(design, family, 1, curvature, site_id, rounds, stop, third=third, modes=modes)
    except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
        return None


def _cut_short(design: Design, family: Family, nagq: int, curvature: str, site_id: str, rounds: int,
               stop: float, reply: dict | None = None, third: bool = False, modes: bool = False) -> dict | None:
    """Local Newton iterations from the site-totals start, at most ``rounds``, ending early where the
    decrement falls below ``stop`` (the point plus its Newton step is then the estimate), as :func:`short_fit`
    returns them, with the engine's modes; ``reply``: the design's set-up reply, if at hand; ``third``: also
    the third derivatives along the covariance parameters (:func:`covariance_third`, user's scale); ``modes``
    (several grouping factors): each factor's levels, their sizes and their modes and SDs at the estimate
    (user's scale), as ``factor_modes`` (:func:`~fedglmm.site.own_modes.factor_modes`)."""
    st = make_setup({site_id: setup_reply(design, family) if reply is None else reply}, family.ndisp)
    engine = make_engine(design, family, nagq, curvature, st.A, st.zs)
    opt = TrustRegionNewton(np.concatenate(start_values(st, family, MANY_FLOOR)),
                            NewtonConfig(tol=1e-4, near=1e-2, max_evals=rounds, single=True), predict_final=True)
    xs = opt.starts
    while xs:
        sums = [engine.sums(x) for x in xs]
        xs = opt.tell(xs, [(-r["value"], -r["grad"], -r["hess"]) for r in sums])
        if xs and opt.accepted is not None and opt.trace and opt.trace[-1][2] < stop:
            break
    cur = opt.current
    if cur is None or not np.all(np.isfinite(cur.H)):
        return None
    x = opt.solution if opt.converged else cur.x
    if not opt.converged and opt.trace and opt.trace[-1][2] < stop:
        x = cur.x + np.linalg.solve(cur.H, -cur.g)
    p, T = len(st.names), st.internal_transform()
    k = p + int(st.mask.sum())
    out = {"names": list(st.names), "z_names": list(st.znames), "beta": st.A @ x[:p],
           "theta": np.r_[canonical_theta(x[p:k], st.mask) / st.theta_scale, x[k:]], "info": T.T @ cur.H @ T,
           "modes": _modes_of(engine), "slope": slope_of(engine, st.A, st.zs, list(st.names))}
    idx = _few_levels(design, st.mask, p, family.ndisp) if design.factors else np.arange(p, len(cur.x))  # (all θ, ψ)
    D3 = covariance_third(engine, cur.x, cur.H, idx) if third else None
    out.update({"third": transform_third(D3, T)} if D3 is not None else {})
    if modes and hasattr(engine, "conditional_modes"):
        out.update(factor_modes(engine, design, family, x, st.zs))
    return out


def _few_levels(design: Design, mask, p: int, ndisp: int) -> np.ndarray:
    """Positions in x = (γ, θ̃, ψ) of the θ entries of the factors with fewer than CUT_SHORT_GROUPS levels
    here (with more, a likelihood is close to quadratic in them: at 1e5 rows over 10 sites, bench_multilevel.py,
    the patients' three cost 1.3 s of 7.3) -- of every factor on fewer than THIRD_ROWS rows -- and ψ, if any."""
    r_idx, _ = theta_index(mask)
    cols = [np.asarray(f.columns) for f in design.factors
            if len(f.levels) < CUT_SHORT_GROUPS or design.n < THIRD_ROWS]
    on = np.isin(r_idx, np.concatenate(cols)) if cols else np.zeros(len(r_idx), bool)
    return p + np.r_[np.flatnonzero(on), np.arange(len(r_idx), len(r_idx) + int(bool(cols)) * ndisp)]


def _modes_of(engine) -> np.ndarray | None:
    """An engine's spherical modes (G × q) where it has one grouping factor, else None."""
    u = getattr(engine, "u", None)
    return np.array(u, copy=True) if isinstance(u, np.ndarray) else None
