"""A site's one-shot message: its description, its set-up sums and, per group, the summaries the
coordinator can fit from -- gaussian: the sufficient statistics n, XᵀX, Xᵀy, yᵀy, ZᵀX, ZᵀZ, Zᵀy (the exact
likelihood is a function of them, :mod:`fedglmm.likelihood.lmm`); binomial and poisson: n and the raw
moment sums of (outcome, covariates, offset) up to order K, from which the coordinator generates
pseudo-data with the same moments (:mod:`fedglmm.coordinator.pseudo`).

Per-group summaries describe a group, so a site refuses them when a group has fewer observations than
its minimum (default 10), or than the moments would pin down; the message then holds only site-level
sums (and, for the hybrid, the site's own fit: :mod:`fedglmm.site.own_fit`).

The site has not seen the other sites' factor levels, so it codes every level it has as a treatment
column (against a reference level with no rows): the columns are then named as in the agreed design, and
the coordinator maps them by name, with zero columns for levels a site does not have.  The readable file
(:func:`to_jsonable`) is what ``fedglmm summarize`` writes for the data steward.
"""
from __future__ import annotations

from dataclasses import replace
from math import comb

import numpy as np
import pandas as pd

from ..errors import InputError
from ..likelihood import fused
from ..likelihood.setup import log_weights, setup_reply, start_sums
from ..likelihood.sparse import aggregator
from ..model.design import build_design, describe_frame
from ..model.families import get_family
from ..model.formula import parse_formula, variables
from ..model.moments import mono_values, monomials
from ..model.options import FEW_GROUPS, MANY_SITES, MIN_GROUP, MIN_POOLED, SKIP_OWN_GROUPS
from ..model.spec import Design, Schema
from ..model.transforms import is_stateful
from .own_fit import ALONE_ROUNDS, own_factor_fit, own_fit, short_fit
from .pooled import pooled_bins

SENTINEL = "\x00"          # a reference level no row has: every real level gets its own column
DEFAULT_ORDER = 4


def _local_schema(desc: dict, spec, transforms: dict | None = None) -> Schema:
    kinds = {c: desc["columns"][c] for c in variables(spec)}
    levels = {c: ([SENTINEL] + list(lv) if c != spec.response else list(lv)) for c, lv in desc["levels"].items()}
    return Schema(kinds=kinds, levels=levels, transforms=dict(transforms or {}))


def summarize(frame: pd.DataFrame, formula: str, family: str, link: str | None, site_id: str,
              order: int | None = None, min_group: int = MIN_GROUP, guard: bool = True, local: dict | None = None,
              transforms: dict | None = None, weights: str | None = None, offset: str | None = None,
              kept: dict | None = None, min_pooled: int = MIN_POOLED, own_modes: bool = True) -> dict:
    """The site's one message (arrays as numpy; :func:`to_jsonable` makes the readable file).

    ``guard=False`` drops the rule that keeps the moments of groups they would pin down (for accuracy
    studies on public data only; the command line has no such switch).  ``local`` (the hybrid's request:
    ``{"nagq", "curvature", "exact"}``) asks for the site's own fit of all its rows, estimates and their
    information (:func:`fedglmm.site.own_fit.own_fit`, or :func:`_one_level_fit`; not for gaussian models).
    ``weights``, ``offset``: columns; ``kept``: a dict the one-shot design is left in; ``min_pooled``: the bins of
    small groups (:mod:`fedglmm.site.pooled`); ``own_modes`` False: no modes in an own fit (``own_fit_modes``).

    A model whose likelihood the shared moments do not carry (negative binomial, Gamma, poisson weights,
    binomial weights that are not whole trials: :func:`_no_summaries`) gets no per-group summaries
    (``unsupported``); the hybrid then starts from the site's own fit or the site totals."""
    spec = parse_formula(formula).with_columns(weights, offset)
    fam = get_family(family, link)
    desc = describe_frame(frame, spec, site_id)
    _pooled_state(spec, transforms, formula, site_id)
    d = build_design(spec, _local_schema(desc, spec, transforms), frame, fam, site_id, checked=True, specs=(specs := {}))
    own = {"desc": desc, "oneshot": (d, specs, SENTINEL)}      # what the site's own fit need not make again
    (kept if kept is not None else {}).update(own)
    q = d.Z.shape[1]
    sums = {"colsum": d.X.sum(axis=0), "colsq": (d.X * d.X).sum(axis=0), "xtx": d.X.T @ d.X, "ztz": d.Z.T @ d.Z}
    if d.factors:
        msg = dict(_factors_message(d, fam, desc, sums, formula, site_id), **spec.columns_payload)
        if fam.name == "gaussian":
            msg["groups"], msg["refused"] = _cell_blocks(d, min_group, site_id)
        if local is not None and msg["groups"] is None:
            msg["local"] = own_factor_fit(frame, d, spec, fam, local, site_id, transforms, min_group, modes=own_modes)
        return msg
    if fam.name != "gaussian":
        sums.update(start_sums(d, fam))
    elif d.weighted:
        sums["ldw"] = log_weights(d.trials)
    order = None if fam.name == "gaussian" else int(order or DEFAULT_ORDER)
    msg = {"kind": "oneshot", "version": 1, "site": site_id, "formula": formula, "family": fam.name,
           "link": fam.link, "order": order, "description": desc, "n": d.n,
           "ngroups": len(d.group_levels) if q else 0, "x_names": list(d.x_names), "z_names": list(d.z_names),
           "theta_mask": np.asarray(d.theta_mask), "sums": sums, "groups": None, "refused": None,
           **spec.columns_payload}
    unsupported = _no_summaries(fam, d, few=local is not None and q > 0 and len(d.group_levels) < FEW_GROUPS)
    if unsupported:
        msg.update(refused=f"site '{site_id}': {unsupported}; a one-shot fit is not possible (use --method hybrid "
                           "or iterative)", unsupported=True)
        if local is not None:
            sizes = np.add.reduceat(np.ones(d.n), d.starts) if q else np.array([float(d.n)])
            msg["local"] = _one_level_fit(frame, d, spec, fam, local, site_id, transforms, min_group) or own_fit(
                frame, spec, fam, sizes, local, site_id, float(min_group), transforms, sums=sums, **own)
        return msg
    starts = d.starts if q else np.zeros(1, dtype=np.int64)
    levels = list(d.group_levels) if q else ["(all rows)"]
    # a group's size counts its observations: rows, or trials for cbind(successes, failures) outcomes
    weight = d.trials if fam.name == "binomial" else np.ones(d.n)
    sizes = np.add.reduceat(weight, starts)
    need = float(min_group)
    variables = moment_variables(d) if fam.name != "gaussian" else None
    nvar = len(variables[0]) if variables is not None else 0
    if variables is not None and guard:
        # moments up to order K of d variables are C(d + K, K) equations; a group with fewer values than
        # that is pinned down by them (its rows can be recovered), so a group needs twice as many
        need = max(need, np.ceil(2.0 * comb(nvar + order, order) / nvar))
    small = sizes < need
    if small.any():
        msg["refused"] = _small_refusal(site_id, small, sizes, levels, need, min_group, order, nvar)
    keep = ~small
    if _one_level(d, fam, local):                   # (the site holds one level of the one grouping factor)
        msg["local"] = _one_level_fit(frame, d, spec, fam, local, site_id, transforms, need, float(sizes[0]))
    elif _own_wanted(local, keep, fam) and (fam.name != "gaussian" or small.any() and int(local.get("sites", 1)) > 1):
        # its third derivatives only where no group's moments go (the pseudo-data have the shape then) or the
        # family has a dispersion parameter (which its pseudo-data carry only roughly); own_fit adds those along θ
        msg["local"] = own_fit(frame, spec, fam, sizes, local, site_id, need, transforms,
                               third=not keep.any() or bool(fam.ndisp), sums=sums, **own)
    if local is not None and fam.name in ("binomial", "poisson") and small.any():
        msg["pooled"] = pooled_bins(d, starts, small, min_pooled, variables, count_outcome=fam.name == "poisson")
    if keep.any():
        msg["groups"] = _gaussian_blocks(d, starts, levels, keep) if fam.name == "gaussian" else \
            _moment_blocks(d, starts, levels, keep, order, variables)
    return msg


def _small_refusal(site_id: str, small, sizes, levels, need: float, min_group: int, order, nvar: int) -> str:
    i = np.flatnonzero(small)[np.argmin(sizes[small])]
    why = "" if need == min_group else (f" (moments up to order {order} of {nvar} variables need groups of at least "
                                         f"{need:g}" + ("; a lower --moments needs fewer)" if order > 2 else ")"))
    return (f"site '{site_id}': {int(small.sum())} group(s) have fewer than {need:g} observations (smallest: "
            f"'{levels[i]}' with {sizes[i]:g}){why}; their own summaries would reveal them and are not sent (a "
            "one-shot fit needs every group: use --method hybrid or iterative)")


def _pooled_state(spec, transforms: dict | None, formula: str, site_id: str) -> None:
    if is_stateful(spec) and not transforms:
        raise InputError(f"site '{site_id}': {formula!r} uses center(), scale(), poly() or mean(), whose "
                         "statistics must be pooled over all sites first: a summary made at one site alone cannot "
                         "have them (fit over the sites, or write the numbers, e.g. I(age - 30))")


def _one_level(d: Design, fam, local: dict | None) -> bool:
    """Whether the site holds one level of the model's one grouping factor, a random intercept, among other
    sites (a GLMM): its own fit then leaves the intercept out (:func:`_one_level_fit`)."""
    return local is not None and fam.name != "gaussian" and int(local.get("sites", 1)) > 1 \
        and d.Z.shape[1] == 1 and len(d.group_levels) == 1


def _one_level_fit(frame, d: Design, spec, fam, local: dict, site_id: str, transforms, need: float,
                   size: float | None = None) -> dict | None:
    """The fit of a site that holds one level of the one grouping factor: the model without its random
    intercept (its level's effect in the intercept), sent as a fit that left the factor out (``alone``) --
    the coordinator takes the factor's variance from how the sites' intercepts differ
    (:func:`fedglmm.coordinator.between.one_level_start`).  It is a summary of the one group: sent only where
    that group's own summaries may leave (its ``size`` -- observations -- at least ``need``) and with three
    observations per parameter.  None where it cannot be made, or the site does not hold one level of the
    one factor (:func:`_one_level`)."""
    size = float(d.n) if size is None else size
    npar = d.X.shape[1] + fam.ndisp
    ok = len(spec.random) == 1 and _one_level(d, fam, local) and size >= need and d.n >= 3 * npar
    group = spec.random[0].group if ok else None
    res = short_fit(frame, replace(spec, random=()), fam, str(local.get("curvature", "observed")), site_id,
                    transforms, rounds=ALONE_ROUNDS, stop=0.0) if group is not None else None
    if res is None or res.get("info") is None:
        return None
    return {"names": res["names"], "z_names": list(d.z_names), "beta": res["beta"],
            "theta": np.r_[0.0, np.asarray(res["theta"], float)], "info": res["info"], "levels": {group: 1},
            "n": float(d.n), "ngroups": 1, "alone": [group]}


def _own_wanted(local: dict | None, keep: np.ndarray, fam) -> bool:
    """Whether the site fits its own rows: asked to, unless the outcome is binomial, there are more than
    ``MANY_SITES`` sites and its few groups (fewer than ``SKIP_OWN_GROUPS``) all go as summaries.  Counts
    keep their fits: the order-2 pseudo-data of a count beside real covariates give slopes some standard
    errors off (a log-linear mean is not a function of the groups' means and covariances), and the sites'
    fits are what corrects them (benchmarks/many_sites_counts.py: 40 count fits over 21-50 sites)."""
    return local is not None and not (fam.name == "binomial" and int(local.get("sites", 1)) > MANY_SITES
                                      and keep.all() and len(keep) < SKIP_OWN_GROUPS)


def _factors_message(d: Design, fam, desc: dict, sums: dict, formula: str, site_id: str) -> dict:
    """With several grouping factors the message holds the site's totals only (the description and the
    set-up sums, per factor where they are per group): the hybrid starts its Newton rounds from them."""
    setup = setup_reply(d, fam)
    sums.update({k: v for k, v in setup.items() if k not in ("n", "ngroups", "x_names", "z_names", "theta_mask",
                                                               "z_groups") and k not in sums})
    return {"kind": "oneshot", "version": 1, "site": site_id, "formula": formula, "family": fam.name,
            "link": fam.link, "order": None, "description": desc, "n": d.n, "ngroups": setup["ngroups"],
            "x_names": list(d.x_names), "z_names": list(d.z_names), "z_groups": setup["z_groups"],
            "theta_mask": np.asarray(d.theta_mask), "sums": sums, "groups": None, "refused": None}


def _no_summaries(fam, d: Design, few: bool = False) -> str | None:
    """Why a model has no one-shot summaries, or None.  ``few``: the hybrid's site has fewer than ``FEW_GROUPS``
    groups; its own fit of so few starts badly, so it sends a negative binomial's or a Gamma model's
    summaries as a poisson's, and pseudo-data fitted in the family shape the start and the surrogate
    (owls_nb over 3 sites: 7 -> 4 rounds; sleepstudy_gamma: 5 -> 4)."""
    if fam.ndisp and not (few and fam.name in ("negative_binomial", "gamma")):
        return (f"one-shot summaries are not available for the {fam.name.replace('_', ' ')} family (the shared "
                "moments do not determine its dispersion)")
    if d.weighted and fam.name == "poisson":
        return "one-shot summaries are not available for poisson models with weights"
    if d.weighted and fam.name == "binomial" and np.any(d.trials != np.round(d.trials)):
        return "one-shot summaries need whole numbers of binomial trials (weights × trials)"
    return None


def _cell_blocks(d: Design, min_group: float, site_id: str):
    """Gaussian, several grouping factors: per cell (the rows that share a level of every factor -- in a
    nested design a lowest-level group) n and S = WᵀW with W = [Z X y−o]: the exact likelihood is a
    function of them.  (blocks, None), or (None, the refusal) when a cell is smaller than ``min_group``.
    Precision weights scale each row by √w (a row of weight 0 counts for nothing)."""
    codes = np.stack([f.codes for f in d.factors], axis=1)
    uniq, cell = np.unique(codes, axis=0, return_inverse=True)
    cell = cell.ravel()
    r = np.sqrt(d.trials) if d.weighted else np.ones(d.n)
    n_c = np.bincount(cell, weights=(r > 0).astype(float), minlength=len(uniq))
    if n_c.min() < min_group:
        i = int(np.argmin(n_c))
        where = ", ".join(f"{f.name} '{f.levels[uniq[i, k]]}'" for k, f in enumerate(d.factors))
        return None, (f"site '{site_id}': {int(np.sum(n_c < min_group))} cell(s) of the grouping factors have fewer "
                      f"than {min_group:g} observations (smallest: {where} with {n_c[i]:g}); their own summaries "
                      "would reveal them and are not sent (a one-shot fit needs every cell: use --method hybrid "
                      "or iterative)")
    W = np.c_[d.Z, d.X, d.y - d.offset] * r[:, None]
    S = aggregator(cell, len(uniq)) @ (W[:, :, None] * W[:, None, :]).reshape(d.n, -1)
    return {"cells": {f.name: [f.levels[c] for c in uniq[:, k]] for k, f in enumerate(d.factors)}, "n": n_c,
            "S": np.asarray(S).reshape(len(uniq), W.shape[1], W.shape[1])}, None


def _gaussian_blocks(d: Design, starts, levels, keep) -> dict:
    """Per group the sufficient statistics of the rows scaled by √w (precision weights; w = 1 without)."""
    y = d.y - d.offset
    X, Z = d.X, d.Z
    count = np.ones(d.n)
    if d.weighted:
        r = np.sqrt(d.trials)
        y, X, Z, count = y * r, X * r[:, None], Z * r[:, None], (d.trials > 0).astype(float)
    red = lambda a: np.add.reduceat(a, starts, axis=0)[keep]   # noqa: E731
    return {"levels": [lv for lv, k in zip(levels, keep) if k], "n": red(count),
            "XtX": red(X[:, :, None] * X[:, None, :]), "Xty": red(X * y[:, None]), "yty": red(y * y),
            "ZtX": red(Z[:, :, None] * X[:, None, :]), "ZtZ": red(Z[:, :, None] * Z[:, None, :]),
            "Zty": red(Z * y[:, None])}


def moment_variables(d: Design) -> tuple[list[str], np.ndarray]:
    """The variables whose moments are shared: outcome, design columns but the intercept, Z-only columns
    and the offset (when there is one)."""
    names = ["(outcome)"] + [n for n in d.x_names if n != "Intercept"]
    cols = [d.y] + [d.X[:, j] for j, n in enumerate(d.x_names) if n != "Intercept"]
    for j, n in enumerate(d.z_names):
        if n != "Intercept" and n not in d.x_names:
            names.append(n)
            cols.append(d.Z[:, j])
    if np.any(d.offset != 0):
        names.append("(offset)")
        cols.append(d.offset)
    return names, np.column_stack(cols)


def _moment_blocks(d: Design, starts, levels, keep, order: int, variables=None) -> dict:
    """Per group: the number of observations and the moment sums of (outcome, covariates, offset).

    A cbind(successes, failures) row stands for its trials as Bernoulli observations (``y`` ones and
    ``m − y`` zeros with the row's covariates): the moments are those of that expanded data, whose
    likelihood is the binomial one up to a constant.  ``variables``: :func:`moment_variables` of ``d``, if at
    hand."""
    names, V = moment_variables(d) if variables is None else variables
    expo = monomials(V.shape[1], order)
    bernoulli = bool(np.all(d.trials == 1.0))
    if d.n >= fused.min_rows() and fused._kernel():                                 # large sites: compiled
        from ..likelihood.moment_sums import group_moments

        sums = group_moments(V[:, 1:], d.y, d.trials, starts, expo, bernoulli)
        count = np.ones(d.n) if bernoulli else d.trials
        return {"levels": [lv for lv, k in zip(levels, keep) if k], "n": np.add.reduceat(count, starts)[keep],
                "variables": names, "moments": sums[keep]}
    xpart = mono_values(V[:, 1:], expo[:, 1:])                                      # (n, M) without y
    with_y = expo[:, 0] > 0
    if np.all(d.trials == 1.0):
        rows = xpart * V[:, [0]] ** expo[None, :, 0]
        count = np.ones(d.n)
    else:
        rows = xpart * np.where(with_y, d.y[:, None], d.trials[:, None])          # Σ over expanded rows
        count = d.trials
    return {"levels": [lv for lv, k in zip(levels, keep) if k], "n": np.add.reduceat(count, starts)[keep],
            "variables": names, "moments": np.add.reduceat(rows, starts, axis=0)[keep]}


def to_jsonable(msg: dict) -> dict:
    """The message as plain JSON, each block named and described, for the data steward to read."""
    def conv(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, list):
            return [conv(v) for v in o]
        return o.item() if isinstance(o, np.generic) else o

    out = conv(msg)
    out["about"] = _describe_blocks(msg)
    return out


def _describe_blocks(msg: dict) -> dict:
    about = {
        "what": "everything this site sends for a one-shot fit: nothing else leaves it",
        "description": "column names and kinds, factor levels present here, group labels present here",
        "sums": "site totals over all rows: column sums and sums of squares, cross-products XᵀX and ZᵀZ, "
                "and the sums for starting values (no row and no group is identifiable from them)",
        "x_names": "fixed-effect design columns, in this site's coding (each factor level present here has "
                   "its own column)",
    }
    if msg.get("local"):
        loc = msg["local"]
        groups = loc.get("ngroups", sum(loc.get("levels", {}).values()))     # (several factors: levels by factor)
        about["local"] = ("this site's own fit of all its rows (for the hybrid's start): the estimates of the "
                          "design columns 'names' (its own coding: each factor against its first level), of "
                          "the random-effect covariance parameters 'theta', and their information matrix: "
                          f"sums over its {groups} groups and {loc['n']:g} observations")
        if loc.get("modes"):
            about["local"] += ("; and for each grouping factor ('modes') the conditional modes and SDs of its levels "
                               "with at least min_group observations: " + ", ".join(
                                   f"{len(m['levels'])} of '{f}'" for f, m in loc["modes"].items()))
        if loc.get("alone"):
            about["local"] += (" -- fitted without the random intercept of its one group (its 'theta' 0): the "
                               "group's effect is in the intercept")
    if msg.get("pooled"):
        b, count = msg["pooled"], "count of positive rows" if msg["family"] == "binomial" else "total count"
        about["pooled"] = (f"the groups too small for their own summaries, pooled (for the hybrid's start): "
                           f"{int(np.sum(b['k']))} groups in {len(b['k'])} bins by (group size, {count}), each "
                           f"of at least {int(np.min(b['k']))} groups; per bin its group size, its "
                           f"number of groups, the sums over its rows of the variables {b['variables']} (s1) and "
                           "of their pairwise products (s2), and over its groups of each variable's squared group "
                           "mean (bd) and of its group mean times the outcome's (by)")
    if msg.get("groups") is None:
        about["groups"] = "none: " + (msg["refused"] or "with several grouping factors the site's totals go (and its "
                                      "own fit, where asked for)")
        return about
    if msg["family"] == "gaussian":
        about["groups"] = ("per group (labels in 'levels'): n, XᵀX, Xᵀy, yᵀy, ZᵀX, ZᵀZ, Zᵀy over the group's "
                           f"rows; {len(msg['groups']['levels'])} groups, smallest "
                           f"{int(np.min(msg['groups']['n']))} rows")
    else:
        about["groups"] = (f"per group: n and the sums over its rows of every product of up to "
                           f"{msg['order']} of the variables {msg['groups']['variables']} (monomials in the "
                           f"order of fedglmm.model.moments.monomials); {len(msg['groups']['levels'])} groups, "
                           f"smallest {int(np.min(msg['groups']['n']))} observations")
    if msg.get("refused"):
        about["groups"] += "; not sent: " + msg["refused"]
    return about
