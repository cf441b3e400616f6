"""The coordinator's stand-ins for the sites, from their one-shot messages: per-group sufficient
statistics (gaussian: the exact likelihood) or pseudo-data with the shared moments (binomial, poisson),
each with an engine (:mod:`fedglmm.likelihood.engine`); and the fit of them, in this process.

The pseudo-data fit is the iterative method's fit -- schema from the sites' descriptions, set-up sums,
internal scale, starting values, Newton -- with the engines evaluated locally: no round reaches a site.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from math import comb
from zlib import crc32

import numpy as np

from ..errors import FedGLMMError, InputError
from ..likelihood.engine import EngineCache, make_engine
from ..likelihood.fit import Estimate, LocalEvaluator, fit_glmm, fit_lmm
from ..likelihood.lmm import LMMSums
from ..likelihood.lmm_sparse import MultiLMMSums
from ..likelihood.setup import Setup, make_setup, setup_reply
from ..likelihood.starts import start_values
from ..model.families import Family
from ..model.moments import monomials
from ..model.options import FitOptions
from ..model.labels import group_codes
from ..model.spec import Design, Grouping, ModelSpec, Schema
from .messages import Merged
from .pseudo import generate_group, generate_order2
from .pseudo.pooled import generate_pooled
from .schema import merge_schema


@dataclass
class Part:
    """One site's stand-in: its description, its set-up reply, its group levels and its engines."""

    description: dict
    setup: dict
    levels: list | None
    engines: EngineCache
    design: Design | None = None                        # the pseudo rows (binomial, poisson)
    pooled: dict = field(default_factory=dict)          # shared by the parts of one fit: their pooled engines


MERGE_ROWS = 20_000     # pseudo rows from which all sites' stand-ins are evaluated as one engine ...
MERGE_PARTS = 8         # ... or sites (50 sites' small engines: 50 calls' overhead per surrogate point)
# a binomial group's compressed pseudo rows at most (the hybrid's): a group of cbind rows with 1e5 trials
# each would otherwise get one row per 4 trials -- 3e7 rows for 1200 data rows, more memory than the machine
MAX_GROUP_ROWS = 100
MAX_PSEUDO_ROWS = 20_000_000      # pseudo rows in all beyond which the stand-ins would not fit in memory


def part_engines(parts: dict, st: Setup, skip=()) -> tuple[dict, dict]:
    """({name: engine}, {name: levels}) of the parts but those in ``skip``, on the internal scale of ``st``.

    Many pseudo rows (at least :data:`MERGE_ROWS`) or parts (:data:`MERGE_PARTS`): the parts' rows as one
    design and one engine, so that the coordinator's work per evaluation grows with the rows it generated,
    not with the number of sites (and the engine runs the fused kernel in parallel chunks).  The groups are
    disjoint, so the sums are the same up to rounding."""
    use = {sid: p for sid, p in parts.items() if sid not in skip}
    designs = [p.design for p in use.values()]
    if len(use) < 2 or any(d is None for d in designs) or \
            sum(d.n for d in designs) < MERGE_ROWS and len(use) < MERGE_PARTS:
        return ({sid: p.engines.get(st.A, st.zs) for sid, p in use.items()}, {sid: p.levels for sid, p in use.items()})
    pool = next(iter(use.values())).pooled
    key = tuple(use)
    if key not in pool:
        d = _concatenate(designs)
        pool[key] = (pool["make"](d, True), list(d.group_levels) if d.Z.shape[1] else None)
    cache, levels = pool[key]
    return {"+".join(key): cache.get(st.A, st.zs)}, {"+".join(key): levels}


def _at_coordinator(engine, spread: bool, kernel: bool, start_only: bool = False):
    """``engine``, its kernel evaluations cut into chunks for the machine's cores where ``spread`` (all sites'
    pseudo rows as one engine: at the coordinator nothing else runs beside them; see
    :data:`~fedglmm.likelihood.fused.SPREAD`), and evaluated by the kernel however few its rows where
    ``kernel`` (the parts hold :data:`MERGE_ROWS` in all, so the kernel is loaded for their merged engine
    anyway: a site's pseudo rows alone, which the hybrid evaluates at its own fit, then take a quarter of
    the numpy engine's time).  ``start_only`` (the hybrid's compressed rows, whose log-likelihood is never
    reported): the family's constant is left out -- it moves no step."""
    if start_only and "_const" in vars(engine):       # (the engines whose constant waits for its first use)
        engine.const = 0.0
    if spread:
        engine.spread = True
    if kernel:
        engine.kernel = True
    return engine


def _concatenate(designs: list) -> Design:
    """One design holding several parts' rows, their groups numbered one after another."""
    offsets = np.cumsum([0] + [len(d.group_levels) for d in designs[:-1]])
    return replace(designs[0], y=np.concatenate([d.y for d in designs]),
                   trials=np.concatenate([d.trials for d in designs]),
                   offset=np.concatenate([d.offset for d in designs]), X=np.vstack([d.X for d in designs]),
                   Z=np.vstack([d.Z for d in designs]),
                   group=np.concatenate([d.group + o for d, o in zip(designs, offsets)]),
                   group_levels=[lv for d in designs for lv in d.group_levels])


def _block_engine(blocks: dict, mask: np.ndarray, A: np.ndarray, zs: np.ndarray) -> LMMSums:
    """Gaussian: the exact LMM sums from per-group sufficient statistics, on the internal scale."""
    b = blocks
    zs = zs if len(zs) else np.ones(mask.shape[0])
    return LMMSums.from_blocks(
        float(np.sum(b["n"])), A.T @ b["XtX"].sum(axis=0) @ A, A.T @ b["Xty"].sum(axis=0),
        float(np.sum(b["yty"])), b["ZtZ"] / np.outer(zs, zs), (b["ZtX"] / zs[None, :, None]) @ A,
        b["Zty"] / zs, mask)


def stand_ins(merged: Merged, messages: dict, options: FitOptions, seed: int = 0, compress: float = 1.0,
              bins: bool = False) -> tuple[dict, dict]:
    """A :class:`Part` for every site that sent per-group summaries, and the pseudo-data diagnostics.
    ``bins``: the sites' pooled small groups (:func:`pooled_design`) join their stand-ins (the hybrid)."""
    family = merged.family
    parts, diagnostics = {}, {}
    pooled = {"make": lambda d, spread=False: EngineCache(
        lambda A, zs: _at_coordinator(make_engine(d, family, options.nagq, options.curvature, A, zs), spread,
                                      pooled.get("kernel", False), compress > 1))}
    drawn = {} if family.name == "gaussian" else pseudo_designs(
        {sid: b for sid in messages if (b := merged.blocks[sid]) is not None and "S" not in b},
        merged.names, merged.znames, merged.mask, family, seed, compress)
    for sid, m in messages.items():
        blocks = merged.blocks[sid]
        extra = merged.pooled.get(sid) if bins else None
        if blocks is None and extra is None:
            continue
        if blocks is None:                     # only pooled small groups (binomial)
            design = pooled_design(extra, merged.names, merged.znames, merged.mask, seed, sid, family.name)
        elif "S" in blocks:                      # gaussian, several grouping factors: per-cell statistics
            design = cell_design(blocks, merged.names, merged.znames, merged.mask, merged.setup[sid]["z_groups"])
            nobs = int(round(float(np.sum(blocks["n"]))))
            engines = EngineCache(lambda A, zs, d=design, k=nobs: MultiLMMSums(replace(d, X=d.X @ A, Z=d.Z / zs), nobs=k))
            parts[sid] = Part(m["description"], merged.setup[sid], {f.name: f.levels for f in design.factors}, engines)
            continue
        elif family.name == "gaussian":
            engines = EngineCache(lambda A, zs, b=blocks: _block_engine(b, merged.mask, A, zs))
            levels = list(blocks["levels"]) if merged.mask.shape[0] else None
            setup = merged.setup[sid] if "xtx" in merged.setup[sid] else _block_setup(merged.setup[sid], blocks,
                                                                                      merged.names)
            parts[sid] = Part(m["description"], setup, levels, engines)
            continue
        else:
            design, diagnostics[sid] = drawn[sid]
            if extra is not None:
                design = _concatenate([design, pooled_design(extra, merged.names, merged.znames, merged.mask,
                                                             seed, sid, family.name)])
        engines = pooled["make"](design)
        levels = list(design.group_levels) if design.Z.shape[1] else None
        parts[sid] = Part(m["description"], setup_reply(design, family), levels, engines, design, pooled)
    # (the engines are built when first asked for, after this)
    pooled["kernel"] = sum(p.design.n for p in parts.values() if p.design is not None) >= MERGE_ROWS
    return parts, diagnostics


def cell_design(blocks: dict, names: list, znames: list, mask: np.ndarray, zgroups: list) -> Design:
    """Stand-in rows for one site's cells: for each cell with S = WᵀW (W = [Z X y]) the rows √λ_k v_kᵀ of
    its eigen-decomposition, so that every cross-product -- and with it the exact gaussian likelihood, a
    function of them alone -- is the site's own."""
    S = np.asarray(blocks["S"], float)
    lam, vec = np.linalg.eigh(S)                                         # (C, d), (C, d, d)
    rows = (vec * np.sqrt(np.maximum(lam, 0.0))[:, None, :]).transpose(0, 2, 1)    # (C, d, d): rows
    C, dim = S.shape[0], S.shape[1]
    W = rows.reshape(C * dim, dim)
    q, p = len(znames), len(names)
    factors = []
    for g in dict.fromkeys(zgroups):
        labels = np.asarray(blocks["cells"][g], dtype=str)
        codes, levels = group_codes(labels)
        factors.append(Grouping(g, np.repeat(codes, dim), levels, np.flatnonzero(np.asarray(zgroups) == g)))
    n = C * dim
    return Design(y=W[:, q + p], trials=np.ones(n), offset=np.zeros(n), X=W[:, q:q + p], Z=W[:, :q],
                  group=factors[0].codes, group_levels=factors[0].levels, x_names=list(names), z_names=list(znames),
                  theta_mask=mask, group_name=factors[0].name, factors=tuple(factors))

def _block_setup(counts: dict, b: dict, names: list) -> dict:
    """A gaussian part's set-up sums from its per-group blocks (when its site totals were not sent, as with
    secure aggregation): the same sums over the groups it sent."""
    xtx = b["XtX"].sum(axis=0)
    colsum = xtx[names.index("Intercept")] if "Intercept" in names else np.zeros(len(names))
    return dict(counts, n=int(round(float(np.sum(b["n"])))), ngroups=len(b["levels"]), colsum=colsum,
                colsq=np.diag(xtx).copy(), xtx=xtx, ztz=b["ZtZ"].sum(axis=0))


def fit_stand_ins(parts: dict, spec: ModelSpec, family: Family, options: FitOptions, transforms: dict | None = None
                  ) -> tuple[Schema, Setup, Estimate]:
    """The fit of the stand-ins, as the iterative method would fit sites holding them (``transforms``: the
    pooled state of the formula's stateful transforms, kept in the schema for prediction)."""
    schema = merge_schema({sid: {"site": sid, **p.description} for sid, p in parts.items()}, spec, family,
                          transforms)
    st = make_setup({sid: p.setup for sid, p in parts.items()}, family.ndisp)
    evaluator = LocalEvaluator(*part_engines(parts, st))
    if family.name == "gaussian":
        return schema, st, fit_lmm(evaluator, st, options)
    return schema, st, fit_glmm(evaluator, st, *start_values(st, family), replace(options, newton=options.newton.local))


def pseudo_design(block: dict, names: list, znames: list, mask: np.ndarray, family: Family, seed: int,
                  compress: float = 1.0) -> tuple:
    """Pseudo rows for one site's groups, as a Design in the agreed coding, and the moment diagnostics.

    ``compress`` = r > 1 (binomial, order 2; the hybrid's start and surrogate): a group of n rows gets
    m = min(max(⌈n/r⌉, min(n, 25)), 100) rows, each standing for n/m Bernoulli observations (a binomial row
    of n/m trials): the likelihood costs r times less, the moments match up to the rounding of the count of
    ones; and (poisson) a group whose closed-form draw has a negative count is drawn again or clipped rather
    than solved on its own (:func:`~fedglmm.coordinator.pseudo.order2.generate_order2`, ``exact`` False)."""
    return pseudo_designs({None: block}, names, znames, mask, family, seed, compress)[None]


def pseudo_designs(blocks: dict, names: list, znames: list, mask: np.ndarray, family: Family, seed: int,
                   compress: float = 1.0) -> dict:
    """:func:`pseudo_design` of every site's groups ({site: block} -> {site: (design, diagnostics)}); at
    order 2 the sites sharing their variables are drawn in one batch (the same rows as one by one)."""
    _check_size(blocks, family, compress)
    out, batches = {}, {}
    for sid, block in blocks.items():
        variables_ = tuple(block["variables"])
        if _order_of(block, len(variables_)) == 2:
            batches.setdefault(variables_, {})[sid] = block
        else:
            out[sid] = _higher_order_design(block, names, znames, mask, family, seed)
    for variables_, batch in batches.items():
        out.update(_order2_designs(batch, list(variables_), names, znames, mask, family, seed, compress))
    return {sid: out[sid] for sid in blocks}


def _check_size(blocks: dict, family: Family, compress: float) -> None:
    """A one-line error where the pseudo rows would not fit in memory: a binomial group of n Bernoulli
    observations gets n rows (the one-shot method; the hybrid's compression caps them), so cbind rows of
    1e5 trials each asked for 3e7 and more."""
    rows = sum(float(np.sum(np.round(np.asarray(b["n"], float)))) for b in blocks.values())
    if compress > 1:
        rows = min(rows, MAX_GROUP_ROWS * sum(len(b["n"]) for b in blocks.values()))
    if rows > MAX_PSEUDO_ROWS:
        what = " (one per binomial trial)" if family.name == "binomial" else ""
        raise FedGLMMError(f"the one-shot pseudo-data would hold {rows:,.0f} rows{what}, more than "
                           f"{MAX_PSEUDO_ROWS:,}: fit with the default method (hybrid) or --method iterative")


def _order2_designs(batch: dict, variables_: list, names, znames, mask, family, seed, compress) -> dict:
    """:func:`pseudo_designs` of sites whose moments stop at order 2, all groups in one closed-form draw,
    each site's from one stream seeded by its group labels."""
    expo = monomials(len(variables_), 2)
    binary, nonneg, keep = _outcome_roles(family)
    # generate on a standard scale: moments of (v − c)/s are a fixed linear map of the raw ones
    moments = [np.asarray(b["moments"], float) for b in batch.values()]
    # a factor's 0/1 columns stay 0/1 (the generator holds its levels exactly)
    levels = factor_levels(variables_)
    c, sc = _standardisation(np.array([m.sum(axis=0) for m in moments]), expo, keep + levels)
    T = _shift_matrix(expo, c, sc)
    targets = np.concatenate([m @ Ts.T for m, Ts in zip(moments, T)])
    nrows = np.round(np.concatenate([np.asarray(b["n"], float) for b in batch.values()]))
    weight = np.ones(len(nrows))
    if compress > 1 and binary:
        m = np.minimum(np.maximum(np.ceil(nrows / compress), np.minimum(nrows, 25)), MAX_GROUP_ROWS)
        weight = nrows / np.maximum(m, 1)
        targets, nrows = targets / weight[:, None], m
    rngs = [np.random.default_rng([seed, crc32("\x1f".join(map(str, b["levels"])).encode())]) for b in batch.values()]
    counts = [len(b["n"]) for b in batch.values()]
    V, gidx, errors = generate_order2(nrows, targets, expo, binary_first=binary, nonneg_first=nonneg, rng=rngs,
                                      exact=compress <= 1, sites=np.repeat(np.arange(len(batch)), counts),
                                      levels=levels)
    goff = np.r_[0, np.cumsum(counts)]
    rows = np.searchsorted(gidx, goff)
    out = {}
    for s, (sid, block) in enumerate(batch.items()):
        Vs = V[rows[s]:rows[s + 1]] * sc[s] + c[s]
        gs = gidx[rows[s]:rows[s + 1]] - goff[s]
        err = list(errors[goff[s]:goff[s + 1]])
        ws = weight[goff[s]:goff[s + 1]]
        trials = ws[gs] if np.any(ws != 1) else np.ones(Vs.shape[0])
        out[sid] = _finish(Vs, gs, err, trials, variables_, block, family, names, znames, mask)
    return out


def _higher_order_design(block: dict, names, znames, mask, family, seed) -> tuple:
    """:func:`pseudo_design` for moments beyond order 2: group by group, each group's stream seeded by its
    label (the pseudo rows do not depend on how groups are spread over sites)."""
    variables_ = list(block["variables"])
    expo = monomials(len(variables_), _order_of(block, len(variables_)))
    binary, nonneg, keep = _outcome_roles(family)
    c, sc = _standardisation(np.asarray(block["moments"], float).sum(axis=0)[None], expo, keep)
    targets = np.asarray(block["moments"], float) @ _shift_matrix(expo, c, sc)[0].T
    parts, errors = [], []
    for level, n, target in zip(block["levels"], block["n"], targets):
        rng = np.random.default_rng([seed, crc32(str(level).encode())])
        Vg, err = generate_group(int(round(n)), expo, np.asarray(target, float), binary=[0] if binary else [],
                                 nonneg=[0] if nonneg else [], rng=rng)
        parts.append(Vg)
        errors.append(err)
    V = np.vstack(parts) * sc[0] + c[0]
    gidx = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    return _finish(V, gidx, errors, np.ones(V.shape[0]), variables_, block, family, names, znames, mask)


def factor_levels(variables_: list) -> list:
    """The positions among the shared variables of one factor's treatment-coded columns (``f[T.b]``, not
    an interaction's): the factor with the most of them, if two or more."""
    by = {}
    for k, name in enumerate(variables_):
        m = _LEVEL.match(str(name))
        if m is not None and ":" not in str(name):
            by.setdefault(m.group(1), []).append(k)
    best = max(by.values(), key=len, default=[])
    return best if len(best) >= 2 else []


_LEVEL = re.compile(r"^(.*)\[T\.(.*)\]$")


def _outcome_roles(family: Family) -> tuple[bool, bool, list]:
    """Whether the outcome (variable 0) is drawn 0/1, whether ≥ 0, and the variables kept off the standard
    scale (the outcome, but a gaussian one)."""
    return (family.name == "binomial", family.name in ("poisson", "negative_binomial", "gamma"),
            [0] if family.name != "gaussian" else [])


def _finish(V, gidx, errors, trials, variables_, block, family, names, znames, mask) -> tuple:
    """A site's pseudo rows V (raw scale) as (design, diagnostics)."""
    if family.name == "gamma":
        # a Gamma outcome must stay positive: a draw the moments put at 0 is lifted to 1 % of its group's mean
        # (the pseudo-data only start and shape the iteration, whose rounds are exact)
        mean = np.bincount(gidx, V[:, 0]) / np.maximum(np.bincount(gidx), 1)
        V[:, 0] = np.maximum(V[:, 0], 0.01 * np.abs(mean[gidx]))
    diag = {"max_rel_error": float(max(errors)) if errors else 0.0, "per_group": errors}
    return _as_design(V, variables_, gidx, list(block["levels"]), trials, names, znames, mask), diag


def pooled_design(bins: dict, names: list, znames: list, mask: np.ndarray, seed: int, site: str,
                  family: str = "binomial") -> Design:
    """Pseudo-groups for a site's pooled small groups (:mod:`~fedglmm.coordinator.pseudo.pooled`), as a
    Design in the agreed coding; their labels start with a NUL, so no real group's label is among them."""
    rng = np.random.default_rng([seed, crc32(f"pooled\x1f{site}".encode())])
    V, gidx = generate_pooled(bins, rng, counts=family == "poisson")
    levels = [f"\x00pooled {site} {j}" for j in range(int(gidx[-1]) + 1)]
    return _as_design(V, list(bins["variables"]), gidx, levels, np.ones(V.shape[0]), names, znames, mask, True)


def _as_design(V, variables_: list, gidx, levels: list, trials, names, znames, mask, products=False) -> Design:
    """Pseudo rows V (columns ``variables_``, the outcome first, as a share of the trials) as a Design in
    the agreed coding: a column of the design the site did not have is zero; ``products``: an interaction
    ``a:b`` of two drawn variables is made their product (draws that do not keep it themselves)."""
    col = {v: V[:, k] for k, v in enumerate(variables_)}
    for nm in list(col) if products else ():
        parts = nm.split(":")
        if len(parts) > 1 and all(p in col for p in parts):
            col[nm] = np.prod([col[p] for p in parts], axis=0)
    n = V.shape[0]
    X = np.column_stack([np.ones(n) if nm == "Intercept" else col.get(nm, np.zeros(n)) for nm in names])
    Z = np.column_stack([np.ones(n) if nm == "Intercept" else col.get(nm, np.zeros(n)) for nm in znames]) \
        if znames else np.zeros((n, 0))
    return Design(y=col["(outcome)"] * trials, trials=trials, offset=col.get("(offset)", np.zeros(n)), X=X, Z=Z,
                  group=np.asarray(gidx, np.int64), group_levels=levels, x_names=list(names),
                  z_names=list(znames), theta_mask=mask)


def _standardisation(tot: np.ndarray, expo: np.ndarray, keep=()) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale (S, d) of each variable from each site's pooled first and second moments ``tot``
    (S, M) (variables in ``keep``, the outcome, stay as they are: 0/1 or counts)."""
    d = expo.shape[1]
    n = tot[:, 0]
    c, sc = np.zeros((len(tot), d)), np.ones((len(tot), d))
    for k in range(d):
        if k in keep:
            continue
        e1 = np.zeros(d, dtype=expo.dtype)
        e1[k] = 1
        i1 = int(np.flatnonzero((expo == e1).all(axis=1))[0])
        i2 = int(np.flatnonzero((expo == 2 * e1).all(axis=1))[0])
        c[:, k] = tot[:, i1] / n
        var = tot[:, i2] / n - c[:, k] ** 2
        sc[:, k] = np.where(var > 1e-12 * np.maximum(1.0, c[:, k] ** 2), np.sqrt(np.maximum(var, 0.0)), 1.0)
    return c, sc


def _shift_matrix(expo: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """T (S, M, M) with T[i] @ raw = moments of (v − c[i])/s[i]: Σ Π((v_k − c_k)/s_k)^{e_k} expands over
    sub-monomials j ≤ e with weights Π_k C(e_k, j_k) (−c_k)^{e_k − j_k} / s_k^{e_k} (only those pairs formed)."""
    I, J = np.nonzero(np.all(expo[None, :, :] <= expo[:, None, :], axis=2))      # j ≤ i
    top = int(expo.max(initial=0)) + 1            # C(a, b) for exponents 0 <= a, b < top (0 where b > a)
    binom = np.array([[float(math.comb(a, b)) for b in range(top)] for a in range(top)])
    pw = (-np.asarray(c, float))[:, :, None] ** np.arange(top)                 # (S, d, top): (−c_k)^p
    w = np.prod(binom[expo[I], expo[J]], axis=1) * np.prod(pw[:, np.arange(expo.shape[1]), expo[I] - expo[J]], axis=2)
    T = np.zeros((len(c), len(expo), len(expo)))
    T[:, I, J] = w
    return T / np.prod(s[:, None, :] ** expo, axis=2)[:, :, None]


def _order_of(block: dict, d: int) -> int:
    """The moment order K from the number of monomials M = C(d + K, K)."""
    M = np.asarray(block["moments"]).shape[1]
    for k in range(1, 9):
        if comb(d + k, k) == M:
            return k
    raise InputError("the moment summaries have an unexpected size")
