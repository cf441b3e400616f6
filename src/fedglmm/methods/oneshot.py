"""One-shot fits from summaries each site sends once, and the hybrid that finishes them exactly.

**The site's message** (:func:`summarize`): its description (columns, factor levels, group labels), the
set-up sums of the iterative method (column moments, starting-value sums), and, per group,

* gaussian models: the sufficient statistics n, XᵀX, Xᵀy, yᵀy, ZᵀX, ZᵀZ, Zᵀy: the exact likelihood is a
  function of them (:mod:`fedglmm.gaussian`);
* binomial and poisson models: n and the raw moment sums of (outcome, covariates, offset) up to order K,
  from which the coordinator generates pseudo-data with the same moments (:mod:`fedglmm.coordinator.pseudo`;
  the approach of estimating GLMMs from one-time shared summary statistics through pseudo-data).

Per-group summaries describe a group, so a site refuses them when a group has fewer rows than its
minimum (default 10); the message then holds only site-level sums.

The site has not seen the other sites' factor levels, so it codes every level it has as a treatment
column (against a reference level with no rows): the columns are then named as in the agreed design,
and the coordinator maps them by name, with zero columns for levels a site does not have.

**The coordinator** turns the messages into *virtual sites* in its own process (per-group blocks for
gaussian models, pseudo-data designs otherwise) and fits them with the iterative machinery; no further
round reaches the real sites.  The **hybrid** method starts the exact Newton rounds on the real sites
from that one-shot estimate (or, where a site refused, from the set-up sums in the same message).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from math import comb

import numpy as np
import pandas as pd

from ..design import build_design, describe_frame, merge_schema
from ..errors import FedGLMMError, InputError
from ..families import Family, get_family
from ..formula import parse_formula, variables
from ..gaussian import LMMSums
from ..protocol import request
from ..site import Site, start_sums
from ..spec import Design, Schema
from ..transport import InProcessTransport
from .iterative import (FitOptions, _check_options, make_result, make_setup, optimize, setup_request,
                        start_values)

SENTINEL = "\x00"          # a reference level no row has: every real level gets its own column
DEFAULT_ORDER = 4
HYBRID_ORDER = 2           # the hybrid needs only a start: means and covariances reveal the least
HYBRID_COMPRESS = 4.0      # the hybrid's binomial pseudo rows stand for up to 4 observations each

# the axes of each summed quantity: x = fixed-effect column, z = random-effect column, g = group
SUM_AXES = {"colsum": "x", "colsq": "x", "xtx": "xx", "ztz": "zz",
            "st_xvx": "xx", "st_xv": "x", "st_xy": "x", "st_sy": "", "st_sv": "",
            "st_aa": "zz", "st_ab": "zz", "st_bb": "zz", "st_at": "zzx", "st_bt": "zzx", "st_tt": "zxzx",
            "st_ww": "zzzz", "st_w": "zz", "xtwx": "xx", "xtwz": "x",
            "mom_ss": "zz", "mom_st": "zzx", "mom_tt": "zxzx", "mom_ww": "zzzz", "mom_w": "zz"}
BLOCK_AXES = {"n": "g", "XtX": "gxx", "Xty": "gx", "yty": "g", "ZtX": "gzx", "ZtZ": "gzz", "Zty": "gz"}


# --- the site's message ---------------------------------------------------------------------------

def _local_schema(desc: dict, spec) -> Schema:
    kinds = {c: desc["columns"][c] for c in variables(spec)}
    levels = {c: ([SENTINEL] + list(lv) if c != spec.response else list(lv)) for c, lv in desc["levels"].items()}
    return Schema(kinds=kinds, levels=levels)


def summarize(frame: pd.DataFrame, formula: str, family: str, link: str | None, site_id: str,
              order: int | None = None, min_group: int = 10, guard: bool = True, local: dict | None = None) -> dict:
    """The site's one message (arrays as numpy; :func:`to_jsonable` makes the readable file).

    ``guard=False`` drops the rule that keeps the moments of groups they would pin down (for accuracy
    studies on public data only; the command line has no such switch).  ``local`` (the hybrid's request:
    ``{"nagq", "curvature"}``) asks, when groups are withheld, for the site's own fit of the withheld
    groups taken together (:func:`_withheld_fit`)."""
    spec = parse_formula(formula)
    fam = get_family(family, link)
    desc = describe_frame(frame, spec, site_id)
    d = build_design(spec, _local_schema(desc, spec), frame, fam, site_id, checked=True)
    q = d.Z.shape[1]
    sums = {"colsum": d.X.sum(axis=0), "colsq": (d.X * d.X).sum(axis=0), "xtx": d.X.T @ d.X, "ztz": d.Z.T @ d.Z}
    if fam.name != "gaussian":
        sums.update(start_sums(d, fam))
    order = None if fam.name == "gaussian" else int(order or DEFAULT_ORDER)
    msg = {"kind": "oneshot", "version": 1, "site": site_id, "formula": formula, "family": fam.name,
           "link": fam.link, "order": order, "description": desc, "n": d.n,
           "ngroups": len(d.group_levels) if q else 0, "x_names": list(d.x_names), "z_names": list(d.z_names),
           "theta_mask": np.asarray(d.theta_mask), "sums": sums, "groups": None, "refused": None}
    starts = d.starts if q else np.zeros(1, dtype=np.int64)
    levels = list(d.group_levels) if q else ["(all rows)"]
    # a group's size counts its observations: rows, or trials for cbind(successes, failures) outcomes
    weight = d.trials if fam.name == "binomial" else np.ones(d.n)
    sizes = np.add.reduceat(weight, starts)
    need = float(min_group)
    if fam.name != "gaussian" and guard:
        # moments up to order K of d variables are C(d + K, K) equations; a group with fewer values than
        # that is pinned down by them (its rows can be recovered), so a group needs twice as many
        nvar = len(moment_variables(d)[0])
        need = max(need, np.ceil(2.0 * comb(nvar + order, order) / nvar))
    small = sizes < need
    if small.any():
        i = np.flatnonzero(small)[np.argmin(sizes[small])]
        why = "" if need == min_group else (f" (moments up to order {order} of {nvar} variables need groups of "
                                             f"at least {need:g}" + ("; a lower --moments needs fewer)" if order > 2
                                                                     else ")"))
        msg["refused"] = (f"site '{site_id}': {int(small.sum())} group(s) have fewer than {need:g} "
                          f"observations (smallest: '{levels[i]}' with {sizes[i]:g}){why}; their own summaries "
                          "would reveal them and are not sent (a one-shot fit needs every group: use --method "
                          "hybrid or iterative)")
    keep = ~small
    if local is not None and small.any() and fam.name != "gaussian" and q:
        msg["local"] = _own_fit(frame, d, sizes, formula, fam, local, site_id, need)
    if keep.any():
        msg["groups"] = _gaussian_blocks(d, starts, levels, keep) if fam.name == "gaussian" else \
            _moment_blocks(d, starts, levels, keep, order)
    return msg


def _own_fit(frame, d: Design, sizes, formula, fam, local, site_id, need) -> dict | None:
    """The site's own GLMM fit of all its rows: β̂, θ̂ and their information, sums over many rows and
    groups.  A site that withholds groups sends it in their stead; the hybrid combines it with the
    one-shot fit of the other sites' groups into its start.  Sent only for at least two groups and
    ``need`` observations, with at least three observations per parameter (as the site rules' 0.33
    parameters per row); not for models with factor columns (the site's own coding of a factor need not
    be the agreed one)."""
    from .iterative import local_fit

    npar = d.X.shape[1] + int(np.asarray(d.theta_mask).sum())
    total = float(sizes.sum())
    if any("[" in nm for nm in d.x_names) or len(sizes) < 2 or total < max(need, 3.0 * npar):
        return None
    options = FitOptions(nagq=int(local.get("nagq", 1)), curvature=str(local.get("curvature", "observed")))
    res = local_fit(frame, formula, fam, options, site_id)
    if res is None or res["names"] != list(d.x_names):
        return None
    return {"beta": res["beta"], "theta": res["theta"], "info": res["info"], "n": total, "ngroups": len(sizes)}


def _gaussian_blocks(d: Design, starts, levels, keep) -> dict:
    y = d.y - d.offset
    X, Z = d.X, d.Z
    red = lambda a: np.add.reduceat(a, starts, axis=0)[keep]   # noqa: E731
    return {"levels": [lv for lv, k in zip(levels, keep) if k], "n": np.diff(np.r_[starts, d.n])[keep].astype(float),
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


def _moment_blocks(d: Design, starts, levels, keep, order: int) -> dict:
    """Per group: the number of observations and the moment sums of (outcome, covariates, offset).

    A cbind(successes, failures) row stands for its trials as Bernoulli observations (``y`` ones and
    ``m − y`` zeros with the row's covariates): the moments are those of that expanded data, whose
    likelihood is the binomial one up to a constant."""
    from ..model.moments import mono_values, monomials

    names, V = moment_variables(d)
    expo = monomials(V.shape[1], order)
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


# --- readable files -------------------------------------------------------------------------------

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


def from_jsonable(obj: dict) -> dict:
    """Back from :func:`to_jsonable` (lists to arrays where the engine needs arrays)."""
    msg = dict(obj)
    msg.pop("about", None)
    msg["theta_mask"] = np.asarray(msg["theta_mask"], bool).reshape(len(msg["z_names"]), len(msg["z_names"]))
    msg["sums"] = {k: np.asarray(v, float) for k, v in msg["sums"].items()}
    if msg.get("groups"):
        msg["groups"] = {k: (v if k in ("levels", "variables") else np.asarray(v, float))
                         for k, v in msg["groups"].items()}
    return msg


def _describe_blocks(msg: dict) -> dict:
    about = {
        "what": "everything this site sends for a one-shot fit: nothing else leaves it",
        "description": "column names and kinds, factor levels present here, group labels present here",
        "sums": "site totals over all rows: column sums and sums of squares, cross-products XᵀX and ZᵀZ, "
                "and the sums for starting values (no row and no group is identifiable from them)",
        "x_names": "fixed-effect design columns, in this site's coding (each factor level present here has "
                   "its own column)",
    }
    if msg.get("groups") is None:
        about["groups"] = "none: " + msg["refused"]
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


# --- the coordinator: mapping to the agreed coding -----------------------------------------------

@dataclass
class Merged:
    spec: object
    schema: Schema
    family: Family
    names: list
    znames: list
    mask: np.ndarray
    setup: dict            # per site: a set-up reply in the agreed coding
    blocks: dict           # per site: its per-group blocks in the agreed coding (or None)
    refused: list


def _remap(arr, axes: str, xmap: np.ndarray, zmap: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, float)
    for ax, kind in enumerate(axes):
        if kind not in "xz":
            continue
        m = xmap if kind == "x" else zmap
        arr = np.take(arr, np.maximum(m, 0), axis=ax)
        index = [slice(None)] * arr.ndim
        index[ax] = m < 0
        arr[tuple(index)] = 0.0
    return arr


def global_names(spec, schema: Schema, family: Family):
    """The agreed design's column names and Λ pattern, from a one-row stand-in frame."""
    row = {}
    for col, kind in schema.kinds.items():
        if col in schema.levels:
            row[col] = [schema.levels[col][0]]
        else:
            row[col] = [0.0 if col == spec.response else 1.0]
    if spec.group and spec.group not in row:
        row[spec.group] = ["g"]
    d = build_design(spec, schema, pd.DataFrame(row), family, "coordinator")
    return list(d.x_names), list(d.z_names), np.asarray(d.theta_mask, bool)


def merge_messages(messages: dict, formula: str, family: Family) -> Merged:
    spec = parse_formula(formula)
    for sid, m in messages.items():
        if m.get("kind") != "oneshot":
            raise InputError(f"site '{sid}': not a one-shot summary")
        if " ".join(m["formula"].split()) != " ".join(formula.split()) or m["family"] != family.name \
                or m["link"] != family.link:
            raise InputError(f"site '{sid}': its summaries were made for '{m['formula']}' ({m['family']}, "
                             f"{m['link']}), not for '{formula}' ({family.name}, {family.link})")
    orders = {m["order"] for m in messages.values()}
    if len(orders) > 1:
        raise InputError(f"the sites' summaries use different moment orders: {sorted(map(str, orders))}")
    schema = merge_schema({sid: m["description"] for sid, m in messages.items()}, spec, family)
    names, znames, mask = global_names(spec, schema, family)
    setup, blocks, refused = {}, {}, []
    for sid, m in messages.items():
        xmap = np.array([m["x_names"].index(nm) if nm in m["x_names"] else -1 for nm in names], dtype=np.int64)
        zmap = np.array([m["z_names"].index(nm) if nm in m["z_names"] else -1 for nm in znames], dtype=np.int64)
        sums = {k: _remap(v, SUM_AXES[k], xmap, zmap) for k, v in m["sums"].items()}
        setup[sid] = {"n": m["n"], "ngroups": m["ngroups"], "x_names": names, "z_names": znames,
                      "theta_mask": mask, **sums}
        if m.get("refused"):
            refused.append(m["refused"])
        g = m.get("groups")
        if not g:
            blocks[sid] = None
        elif family.name == "gaussian":
            blocks[sid] = {"levels": list(g["levels"]),
                           **{k: _remap(g[k], BLOCK_AXES[k], xmap, zmap) for k in BLOCK_AXES}}
        else:
            blocks[sid] = dict(g, x_names=m["x_names"], z_names=m["z_names"])
    return Merged(spec, schema, family, names, znames, mask, setup, blocks, refused)


# --- virtual sites ---------------------------------------------------------------------------------

class _VirtualSite(Site):
    """A site in the coordinator's own process, standing in for a real one from its summaries."""

    def __init__(self, site_id: str, description: dict, setup_reply: dict):
        super().__init__(site_id, None)
        self._description = description
        self._setup_reply = setup_reply

    def _on_describe(self, req):
        self._described = req["formula"]
        return {"site": self.site_id, **self._description}


class _BlockSite(_VirtualSite):
    """Gaussian: answers from per-group sufficient statistics, exactly as the real site would."""

    def __init__(self, site_id, description, setup_reply, blocks, mask):
        super().__init__(site_id, description, setup_reply)
        self.blocks, self.mask = blocks, mask

    def _on_setup(self, req):
        self.family = get_family(req["family"], req.get("link"))
        self._engine, self._transform = None, None
        return self._setup_reply

    def _engine_for(self, req):
        A = np.asarray(req["transform"], float)
        zs = np.asarray(req.get("zscale", np.ones(0)), float)
        b = self.blocks
        q = self.mask.shape[0]
        zs = zs if len(zs) else np.ones(q)
        return LMMSums.from_blocks(
            float(np.sum(b["n"])), A.T @ b["XtX"].sum(axis=0) @ A, A.T @ b["Xty"].sum(axis=0),
            float(np.sum(b["yty"])), b["ZtZ"] / np.outer(zs, zs), (b["ZtX"] / zs[None, :, None]) @ A,
            b["Zty"] / zs, self.mask)

    def _on_finalize(self, req):
        eng = self._engine_for(req)
        reply = self._evaluate_one(eng, np.asarray(req["point"], float))
        if self.mask.shape[0]:
            modes, sds = eng.conditional_modes(req["point"], np.asarray(req["beta_internal"]), float(req["sigma"]))
            reply.update({"levels": list(self.blocks["levels"]), "modes": modes, "condsd": sds})
        return reply


class _DesignSite(_VirtualSite):
    """Binomial / poisson: a site whose rows are pseudo-data in the agreed coding."""

    def __init__(self, site_id, description, setup_reply, design: Design):
        super().__init__(site_id, description, setup_reply)
        self._design = design

    def _build(self, req, spec, schema):
        return self._design


def pseudo_design(block: dict, names: list, znames: list, mask: np.ndarray, family: Family, seed: int,
                  compress: float = 1.0) -> tuple:
    """Pseudo rows for one site's groups, as a Design in the agreed coding, and the moment diagnostics.

    ``compress`` = r > 1 (binomial, order 2; the hybrid's start and surrogate): a group of n rows gets
    m = max(⌈n/r⌉, min(n, 25)) rows, each standing for n/m Bernoulli observations (a binomial row of n/m
    trials): the likelihood costs r times less, the moments match up to the rounding of the count of ones."""
    from zlib import crc32

    from ..coordinator.pseudo import generate_group, generate_order2
    from ..model.moments import monomials

    variables_ = list(block["variables"])
    expo = monomials(len(variables_), _order_of(block, len(variables_)))
    binary = [0] if family.name == "binomial" else []
    nonneg = [0] if family.name == "poisson" else []
    # generate on a standard scale: moments of (v − c)/s are a fixed linear map of the raw ones
    c, sc = _standardisation(block, expo, keep=[0] if family.name != "gaussian" else [])
    T = _shift_matrix(expo, c, sc)
    targets = np.asarray(block["moments"], float) @ T.T
    nrows = np.round(np.asarray(block["n"], float))
    weight = np.ones(len(nrows))
    if compress > 1 and binary and expo.sum(axis=1).max() == 2:
        m = np.maximum(np.ceil(nrows / compress), np.minimum(nrows, 25))
        weight = nrows / np.maximum(m, 1)
        targets, nrows = targets / weight[:, None], m
    if expo.sum(axis=1).max() == 2:
        # order 2 is a closed form: all groups at once, from one stream seeded by the site's group labels
        rng = np.random.default_rng([seed, crc32("\x1f".join(map(str, block["levels"])).encode())])
        V, gidx, errors = generate_order2(nrows, targets, expo, binary_first=bool(binary),
                                          nonneg_first=bool(nonneg), rng=rng)
        V = V * sc + c
        errors = list(errors)
    else:
        parts, errors = [], []
        for level, n, target in zip(block["levels"], block["n"], targets):
            # each group's stream is seeded by its label: the pseudo rows do not depend on how groups are
            # spread over sites
            rng = np.random.default_rng([seed, crc32(str(level).encode())])
            Vg, err = generate_group(int(round(n)), expo, np.asarray(target, float), binary=binary,
                                     nonneg=nonneg, rng=rng)
            parts.append(Vg)
            errors.append(err)
        V = np.vstack(parts) * sc + c
        gidx = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    diag = {"max_rel_error": float(max(errors)) if errors else 0.0, "per_group": errors}
    col = {v: V[:, k] for k, v in enumerate(variables_)}
    n = V.shape[0]
    X = np.column_stack([np.ones(n) if nm == "Intercept" else col.get(nm, np.zeros(n)) for nm in names])
    Z = np.column_stack([np.ones(n) if nm == "Intercept" else col.get(nm, np.zeros(n)) for nm in znames]) \
        if znames else np.zeros((n, 0))
    trials = weight[gidx] if np.any(weight != 1) else np.ones(n)
    y = col["(outcome)"] * trials
    design = Design(y=y, trials=trials, offset=col.get("(offset)", np.zeros(n)), X=X, Z=Z,
                    group=gidx.astype(np.int64), group_levels=list(block["levels"]), x_names=list(names),
                    z_names=list(znames), theta_mask=mask)
    return design, diag


def _standardisation(block: dict, expo: np.ndarray, keep=()) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale of each variable from the site's pooled first and second moments (variables in
    ``keep``, the outcome, stay as they are: 0/1 or counts)."""
    tot = np.asarray(block["moments"], float).sum(axis=0)
    d = expo.shape[1]
    n = tot[0]
    c, sc = np.zeros(d), np.ones(d)
    for k in range(d):
        if k in keep:
            continue
        e1 = np.zeros(d, dtype=expo.dtype)
        e1[k] = 1
        i1 = int(np.flatnonzero((expo == e1).all(axis=1))[0])
        i2 = int(np.flatnonzero((expo == 2 * e1).all(axis=1))[0])
        c[k] = tot[i1] / n
        var = tot[i2] / n - c[k] ** 2
        sc[k] = np.sqrt(var) if var > 1e-12 * max(1.0, c[k] ** 2) else 1.0
    return c, sc


def _shift_matrix(expo: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """T with T @ raw = moments of (v − c)/s: Σ Π((v_k − c_k)/s_k)^{e_k} expands over sub-monomials j ≤ e
    with weights Π_k C(e_k, j_k) (−c_k)^{e_k − j_k} / s_k^{e_k}."""
    from scipy.special import comb as binom

    E = expo[:, None, :]
    J = expo[None, :, :]
    below = np.all(J <= E, axis=2)
    w = np.prod(binom(E, J) * np.where(E - J > 0, (-c) ** np.maximum(E - J, 0), 1.0), axis=2)
    return np.where(below, w, 0.0) / np.prod(s ** expo, axis=1)[:, None]


def _order_of(block: dict, d: int) -> int:
    """The moment order K from the number of monomials M = C(d + K, K)."""
    from math import comb

    M = np.asarray(block["moments"]).shape[1]
    for k in range(1, 9):
        if comb(d + k, k) == M:
            return k
    raise InputError("the moment summaries have an unexpected size")


def virtual_transport(merged: Merged, messages: dict, seed: int = 0, compress: float = 1.0
                      ) -> tuple[InProcessTransport, dict]:
    sites, diagnostics = {}, {}
    for sid, m in messages.items():
        if merged.blocks[sid] is None:
            continue
        if merged.family.name == "gaussian":
            sites[sid] = _BlockSite(sid, m["description"], merged.setup[sid], merged.blocks[sid], merged.mask)
        else:
            design, diag = pseudo_design(merged.blocks[sid], merged.names, merged.znames, merged.mask,
                                         merged.family, seed, compress)
            diagnostics[sid] = diag
            sites[sid] = _DesignSite(sid, m["description"], merged.setup[sid], design)
    return InProcessTransport(sites), diagnostics


# --- fits -------------------------------------------------------------------------------------------

def _virtual_fit(merged: Merged, messages: dict, formula: str, family: Family, options: FitOptions, seed: int,
                 compress: float = 1.0):
    from .iterative import fit_iterative

    transport, diagnostics = virtual_transport(merged, messages, seed, compress)
    return fit_iterative(transport, formula, family, options), diagnostics, transport


def fit_from_messages(messages: dict, formula: str, family: Family, options: FitOptions = FitOptions(),
                      rounds: int = 0, bytes_to: int = 0, bytes_from: int = 0, seed: int = 0):
    """The one-shot fit from the sites' messages (the method ``oneshot`` and ``fit --summaries``)."""
    t0 = time.perf_counter()
    merged = merge_messages(messages, formula, family)
    if merged.refused:
        raise FedGLMMError(merged.refused[0])
    res, diagnostics, _ = _virtual_fit(merged, messages, formula, family, options, seed)
    res.rounds, res.bytes_to_sites, res.bytes_from_sites = rounds, bytes_to, bytes_from
    res.nsites, res.site_ids = len(messages), list(messages)
    res.seconds = time.perf_counter() - t0
    if family.name == "gaussian":
        res.method = f"one-shot {res.method} (exact, from per-group sufficient statistics)"
    else:
        err = max(d["max_rel_error"] for d in diagnostics.values())
        res.method = f"one-shot {res.method} on pseudo-data (moments up to order {messages[next(iter(messages))]['order']})"
        res.messages.append(f"pseudo-data match the shared moments to {err:.1e} (largest relative error); "
                            "the log-likelihood is that of the pseudo-data")
    return res


def fit_oneshot(transport, formula: str, family: Family, options: FitOptions = FitOptions(),
                order: int | None = None, seed: int = 0):
    """One round: every site sends its one message; the coordinator fits from them."""
    _check_options(formula, family, options)
    replies = transport.broadcast(request("oneshot", formula=formula, family=family.name, link=family.link,
                                          order=order))
    return fit_from_messages(replies, formula, family, options, transport.rounds, transport.bytes_to_sites,
                             transport.bytes_from_sites, seed)


def fit_hybrid(transport, formula: str, family: Family, options: FitOptions = FitOptions(),
               order: int | None = None, seed: int = 0):
    """The one-shot round, then exact Newton rounds on the real sites from its estimate.

    The one-shot part only provides the start, so it asks for moments up to order 2 (means and
    covariances: the least revealing, accepted for the smallest groups) unless ``order`` says otherwise."""
    t0 = time.perf_counter()
    order = HYBRID_ORDER if order is None else order
    spec = _check_options(formula, family, options)
    replies = transport.broadcast(request("oneshot", formula=formula, family=family.name, link=family.link,
                                          order=order, local={"nagq": options.nagq, "curvature": options.curvature}))
    merged = merge_messages(replies, formula, family)
    st = make_setup(spec, merged.schema, merged.setup)
    own = {sid: r["local"] for sid, r in replies.items() if r.get("local") is not None}
    start = first = surrogate = None
    if any(b is not None for b in merged.blocks.values()):
        # the one-shot estimate from the groups the sites did send (all of them, unless some were small);
        # it is only a start, so if it cannot be had the Newton rounds start from the site totals
        try:
            # only a start: the pseudo-data fit need not be polished
            # (and by Laplace: the pseudo-data differ from the data by more than AGHQ does from Laplace)
            loose = options if family.name == "gaussian" else \
                replace(options, nagq=1, newton=replace(options.newton, tol=1e-4, near=1e-2))
            first, _, virtual = _virtual_fit(merged, replies, formula, family, loose, seed, HYBRID_COMPRESS)
        except (FedGLMMError, np.linalg.LinAlgError, ValueError):
            first = None
    if first is not None:
        if family.name == "gaussian" and not merged.refused:
            # per-group sufficient statistics give the exact fit: nothing is left to iterate
            first.rounds, first.bytes_to_sites = transport.rounds, transport.bytes_to_sites
            first.bytes_from_sites, first.nsites = transport.bytes_from_sites, len(replies)
            first.site_ids, first.seconds = list(replies), time.perf_counter() - t0
            return first
        start = _internal_start(first, st)
        if family.name == "gaussian":
            start = start[1]
        else:
            # the one-shot estimate and the site-totals start are both tried in the first Newton round,
            # with, when sites fitted their withheld groups, the combination of those fits with it
            surrogate = _pseudo_objective(virtual, st)
            combined = _combined_start(st, list(own.values()), np.concatenate(start),
                                       _pseudo_objective(virtual, st, skip=own)) if own else None
            # the site-totals start is a safety net where summaries are missing
            totals = [start_values(st, family)] if merged.refused else []
            start = tuple(([] if combined is None else [combined]) + [start] + totals)
            if len(start) == 1:
                start = start[0]
    elif own and family.name != "gaussian":
        combined = _combined_start(st, list(own.values()))
        if combined is not None:
            start = (combined, start_values(st, family))
    core = optimize(transport, st, family, options, start,
                    first_extra={"setup": setup_request(formula, family, options, merged.schema)},
                    surrogate=surrogate)
    res = make_result(formula, family, options, st, core, transport, t0)
    if merged.refused:
        # a site's groups less those it sent summaries for
        ngr = sum(int(r["ngroups"]) - (len(r["groups"]["levels"]) if r.get("groups") else 0)
                  for r in replies.values() if r.get("refused"))
        what = f"{ngr} group(s) at {len(merged.refused)} site(s), below a site's minimum size or the moment rule"
        source = ("the sites' own fits combined with the one-shot fit of the other groups" if own and first is not None
                  else "the sites' own fits" if own else
                  "the one-shot fit of the other groups" if first is not None else "site totals")
        res.messages.append(f"summaries of small groups stayed at their sites ({what}); the Newton rounds, "
                            f"which use every group, started from {source}")
    return res


def _combined_start(st, own: list, x_pseudo=None, pseudo=None):
    """A start from estimates of disjoint sets of groups (internal scale): the sites' own fits and the
    one-shot fit (with the information of the pseudo-data of the other sites).  The fixed effects are
    combined with weights their marginal information (the inverse of their covariance), the covariance
    parameters with weights the numbers of groups behind them (the information about θ changes too
    quickly with θ to weight by it).  None if that cannot be done."""
    p, nx = len(st.names), len(st.names) + int(st.mask.sum())
    T = st.internal_transform()
    Ti = np.linalg.inv(T)
    parts = []                                   # (information, (γ, θ̃), number of groups behind them)
    if x_pseudo is not None and pseudo is not None:
        parts.append((pseudo(x_pseudo)[2], x_pseudo, st.ngroups - sum(o.get("ngroups", 0) for o in own)))
    for loc in own:
        try:
            H = Ti.T @ np.asarray(loc["info"], float) @ Ti
            x = T @ np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)]
            parts.append((H, x, float(loc["ngroups"])))
        except (KeyError, ValueError, TypeError):
            continue
    Ib, bb, wt, tt = 0.0, 0.0, 0.0, 0.0
    for H, x, ng in parts:
        if H.shape != (nx, nx) or not (np.all(np.isfinite(H)) and np.all(np.isfinite(x))):
            continue
        try:
            Vb = np.linalg.inv(H)[:p, :p]
            Ig = np.linalg.inv(Vb)
        except np.linalg.LinAlgError:
            continue
        Ib, bb = Ib + Ig, bb + Ig @ x[:p]
        wt, tt = wt + max(ng, 0.0), tt + max(ng, 0.0) * x[p:]
    if wt == 0.0 and nx > p:
        return None
    try:
        gamma = np.linalg.solve(Ib, bb)
    except (np.linalg.LinAlgError, ValueError):
        return None
    theta = tt / wt if nx > p else np.zeros(0)
    return (gamma, theta) if np.all(np.isfinite(gamma)) and np.all(np.isfinite(theta)) else None


def _pseudo_objective(virtual, st, skip=()):
    """−ℓ of the pseudo-data (value, gradient, Hessian) on the iterative method's internal scale, computed
    by the coordinator from the virtual sites of the one-shot fit (but those in ``skip``)."""
    engines = [site._engine_for(st.scale) for sid, site in virtual.sites.items() if sid not in skip]

    def objective(x):
        evs = [eng.evaluate(np.asarray(x, float), hess=True) for eng in engines]
        return (-sum(ev.value for ev in evs), -sum(ev.grad for ev in evs), -sum(ev.hess for ev in evs))

    return objective if engines else None


def _internal_start(res, st) -> tuple[np.ndarray, np.ndarray]:
    """A fit's estimates on the iterative method's internal scale (γ = A⁻¹β, θ̃ = diag(zs) θ)."""
    gamma = np.linalg.solve(st.A, res.fixef.reindex(st.names).to_numpy())
    return gamma, np.asarray(res.theta, float) * st.theta_scale
