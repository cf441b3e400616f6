"""Grouping factors whose levels are shared by several sites: where the shared random effects sit, and one
site's split of its design into its own random effects and its columns of the shared ones.

A level of a grouping factor present at two or more sites (the same questionnaire item answered at every
site, a doctor working at two hospitals) is *shared*; all other levels -- of every factor -- live at one
site and are *local* to it.  Notation (extending :mod:`fedglmm.model.spec`):

* v: the random effects of the shared levels, spherical (v ~ N(0, I)), one q_f-vector per shared level
  of each factor f, stacked factor by factor (in design order) and, within a factor, in the order of
  :attr:`SharedLayout.levels`; Q = dim(v).  b_v = Λ_v v with Λ_v block-diagonal: Λ_f once per shared
  level (internal scale: Λ̃_f).  Gaussian models add σ as in lme4 (b_v = σ Λ_v v).
* u_s: site s's local random effects -- every level that lives at s, of every factor (a factor may be
  shared in some levels and local in others).
* Z_v: a site's columns of the shared effects (n_s × Q_s; Q_s ≤ Q the shared columns present there), so
  that η = Xβ + o + Z_v b_v + Z_u Λ_u u_s for the site's rows.

Given (u_1, …, u_S, v) the rows are independent, so the joint problem has an arrow structure: given v
each site's local problem is its own, and the sites are coupled through v alone.  A site therefore
treats b_v like extra fixed-effect coefficients with the design Z_v, and eliminates its local effects
(:mod:`fedglmm.likelihood.lmm_shared` for gaussian models); the coordinator holds v.

The site's local design keeps every factor: the rows of a shared level get a *placeholder* level of that
factor whose Z columns are zero (its random effect is then exactly 0 and contributes nothing), so the
local engines (:mod:`fedglmm.likelihood.sparse`) need no special case.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..model.spec import Design, Grouping, theta_index

PLACEHOLDER = "\x00shared"        # the local level standing for a factor's shared levels at a site


@dataclass(frozen=True)
class SharedLayout:
    """The shared levels of each factor that has any (design order), and each factor's q (columns per
    level).  ``levels[f]`` fixes the order of f's shared effects in v."""

    factors: tuple[str, ...]
    levels: dict = field(default_factory=dict)      # factor -> its shared levels, in v's order
    q: dict = field(default_factory=dict)           # factor -> columns per level

    @classmethod
    def from_payload(cls, payload: dict, q: dict) -> "SharedLayout":
        """From a request's ``shared`` ({factor: [levels]}, in design order) and each factor's q."""
        names = tuple(payload)
        return cls(names, {f: list(map(str, payload[f])) for f in names}, {f: int(q[f]) for f in names})

    def payload(self) -> dict:
        return {f: list(self.levels[f]) for f in self.factors}

    @property
    def Q(self) -> int:
        return int(sum(len(self.levels[f]) * self.q[f] for f in self.factors))

    def offset(self, factor: str) -> int:
        """Position in v of factor ``factor``'s first shared effect."""
        at = 0
        for f in self.factors:
            if f == factor:
                return at
            at += len(self.levels[f]) * self.q[f]
        raise KeyError(factor)

    def columns(self, factor: str, level_index: np.ndarray) -> np.ndarray:
        """Positions in v of the q_f effects of the given shared levels: (len(level_index), q_f)."""
        q = self.q[factor]
        return self.offset(factor) + np.asarray(level_index)[:, None] * q + np.arange(q)


def lambda_v(lam: np.ndarray, layout: SharedLayout, zcols: dict) -> np.ndarray:
    """Λ_v (Q × Q): each shared factor's block of Λ (``lam``, over all Z columns; ``zcols[f]``: factor f's
    Z columns) once per shared level."""
    out = np.zeros((layout.Q, layout.Q))
    for f in layout.factors:
        block = lam[np.ix_(zcols[f], zcols[f])]
        idx = layout.columns(f, np.arange(len(layout.levels[f])))
        out[idx[:, :, None], idx[:, None, :]] = block
    return out


class SharedLambda:
    """Λ_v as a function of θ, and its derivative in each θ entry (constant: Λ_v is linear in θ), for the
    coordinator's pooled algebra over the shared levels (gaussian and GLMM alike)."""

    def __init__(self, layout: SharedLayout, mask: np.ndarray, zcols: dict, p: int):
        self.layout, self.mask, self.zcols, self.p = layout, np.asarray(mask, bool), zcols, p
        self.index = theta_index(self.mask)
        q = self.mask.shape[0]
        self.k = len(self.index[0])
        self.Q = layout.Q
        self.dL = []
        for t in range(self.k):
            unit = np.zeros((q, q))
            unit[self.index[0][t], self.index[1][t]] = 1.0
            self.dL.append(lambda_v(unit, layout, zcols))

    def L(self, theta) -> np.ndarray:
        lam = np.zeros(self.mask.shape)
        lam[self.index] = theta
        return lambda_v(lam, self.layout, self.zcols)


def by_factor(layout: SharedLayout, zcols: dict, modes: np.ndarray, sds: np.ndarray) -> dict:
    """The shared levels' modes and SDs (over v's columns) as levels, modes and SDs per factor (empty for
    factors without shared levels)."""
    out = {"levels": {}, "modes": {}, "condsd": {}}
    for f, c in zcols.items():
        levels = layout.levels.get(f, [])
        idx = layout.columns(f, np.arange(len(levels))) if levels else np.zeros((0, len(c)), int)
        out["levels"][f], out["modes"][f], out["condsd"][f] = list(levels), modes[idx], sds[idx]
    return out


@dataclass
class SiteSplit:
    """One site's design split by :func:`split_design`."""

    local: Design               # every factor, shared rows moved to each factor's placeholder level
    Zv: np.ndarray              # (n, Q_s): the site's columns of the shared effects
    cols: np.ndarray            # (Q_s,): their positions in v (increasing)
    local_levels: dict          # factor -> the site's local levels (placeholder excluded), in code order
    cells: dict                 # shared factor -> {level: rows (trials for cbind) at this site}


def split_design(d: Design, layout: SharedLayout, weight: np.ndarray | None = None) -> SiteSplit:
    """The site's local design and its shared columns (see the module docstring).  ``weight``: what a row
    counts for in a (level, site) cell (trials for ``cbind`` binomial outcomes; default 1)."""
    weight = np.ones(d.n) if weight is None else np.asarray(weight, float)
    Z = np.array(d.Z, float)
    gcols, blocks, factors, local_levels, cells = [], [], [], {}, {}
    for f in d.groupings:
        shared = layout.levels.get(f.name, [])
        pos = {lv: i for i, lv in enumerate(shared)}
        where = np.array([pos.get(str(lv), -1) for lv in f.levels], dtype=np.int64)    # per site level
        row_shared = where[f.codes] >= 0
        keep = np.flatnonzero(where < 0)
        recode = np.full(len(f.levels), len(keep), dtype=np.int64)                   # shared -> placeholder
        recode[keep] = np.arange(len(keep))
        levels = [f.levels[i] for i in keep]
        local_levels[f.name] = levels
        if row_shared.any():
            levels = levels + [PLACEHOLDER]
            present = np.flatnonzero(where >= 0)
            cells[f.name] = {str(f.levels[i]): float(np.sum(weight[f.codes == i])) for i in present}
            idx = layout.columns(f.name, where[present])                               # (levels here, q)
            block = np.zeros((d.n, idx.size))
            slot = np.full(len(f.levels), -1, dtype=np.int64)
            slot[present] = np.arange(len(present))
            rows = np.flatnonzero(row_shared)
            q = f.q
            block[rows[:, None], slot[f.codes[rows]][:, None] * q + np.arange(q)] = Z[np.ix_(rows, f.columns)]
            gcols.append(idx.ravel())
            blocks.append(block)
            Z[np.ix_(rows, f.columns)] = 0.0
        factors.append(Grouping(f.name, recode[f.codes], levels, f.columns))
    cols = np.concatenate(gcols) if gcols else np.zeros(0, dtype=np.int64)
    Zv = np.hstack(blocks) if blocks else np.zeros((d.n, 0))
    order = np.argsort(cols, kind="stable")
    first = factors[0]
    local = replace(d, Z=Z, group=first.codes, group_levels=list(first.levels), group_name=first.name,
                    factors=tuple(factors))
    return SiteSplit(local, Zv[:, order], cols[order], local_levels, cells)


def embed(values: np.ndarray, cols: np.ndarray, Q: int, axes: tuple[int, ...], lead: int = 0) -> np.ndarray:
    """A site's array over (its Q_s shared columns, then ``lead``-free trailing coordinates) placed in the
    global layout: along each axis in ``axes``, index i < Q_s goes to ``cols[i]`` and index Q_s + j to
    Q + j (the coordinates after the shared ones, e.g. the fixed effects and the outcome)."""
    out_shape = list(values.shape)
    for ax in axes:
        out_shape[ax] = Q + values.shape[ax] - len(cols)
    out = np.zeros(out_shape)
    index = []
    for ax in range(values.ndim):
        if ax in axes:
            rest = values.shape[ax] - len(cols)
            index.append(np.r_[cols, Q + np.arange(rest)].astype(np.int64))
        else:
            index.append(np.arange(values.shape[ax]))
    out[np.ix_(*index)] = values
    return out
