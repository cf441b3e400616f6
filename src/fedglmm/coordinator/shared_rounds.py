"""The rounds of a gaussian fit whose grouping factors have levels at several sites (shared levels,
:mod:`fedglmm.likelihood.shared`): each site sends, in the global layout of the shared effects v, its
sums G_s and log det V_u,s with their θ-derivatives (:class:`~fedglmm.likelihood.lmm_shared.SharedLMMSums`);
their total gives the pooled A, b, c, d of the profiled criterion exactly
(:class:`~fedglmm.likelihood.lmm_shared.SharedLMM`), so the Newton iteration of
:func:`fedglmm.likelihood.fit.fit_lmm` runs unchanged and takes as many rounds as with local levels.

The final round sends the sites the shared modes b̂_v and N = Var(b_v | y) / σ² (from the sums of the
round before, moved to the final point along their second-order expansion): each site then returns the
modes of its own levels given b̂_v.  The coordinator reports the shared levels' modes itself.
"""
from __future__ import annotations

import numpy as np

from ..likelihood.fit import profiled_deviance
from ..likelihood.lmm_shared import SUM_KEYS, SharedLMM, to_global
from ..likelihood.setup import Setup, sum_replies
from ..likelihood.shared import SharedLayout, by_factor

POOLED = "(shared levels)"      # the part of the final replies that the coordinator adds


def shared_setup(st: Setup, schema) -> Setup:
    """``st`` with the schema's shared levels, each counted once in the number of levels per factor."""
    if not schema.shared:
        return st
    st.shared = {f: dict(levels) for f, levels in schema.shared.items()}
    if st.factor_groups:
        st.factor_groups = {f: int(schema.nlevels.get(f, n)) for f, n in st.factor_groups.items()}
        st.ngroups = int(sum(st.factor_groups.values()))
    else:                  # one grouping factor: treated as one of several (the sites' modes come by factor)
        (name, n), = schema.nlevels.items()
        st.factor_groups, st.zgroups, st.ngroups = {name: int(n)}, [name] * st.mask.shape[0], int(n)
    return st


class SharedRoundEvaluator:
    """The evaluator of a model with shared levels, over ``rounds`` (a
    :class:`~fedglmm.coordinator.rounds.RoundEvaluator` built with :meth:`total`, whose totals it turns
    into the pooled sums)."""

    def __init__(self, setup: Setup, reml: bool, rounds=None):
        self.rounds = rounds
        zcols = setup.factor_columns()
        self.layout = SharedLayout.from_payload({f: list(lv) for f, lv in setup.shared.items()},
                                                {f: len(c) for f, c in zcols.items()})
        self.pool = SharedLMM(self.layout, setup.mask, zcols, len(setup.names))
        self.zcols, self.reml, self.seen = zcols, reml, []

    def total(self, replies: dict, keys) -> dict:
        """The sites' shared sums added up in the global layout (a site's own layout, with ``scols``,
        placed there first; masked replies arrive as one total already in it)."""
        Q = self.layout.Q
        return sum_replies({sid: to_global(r, Q) for sid, r in replies.items()}, keys)

    third = True        # the pooled sums' third derivatives too, when the fit asks for them (d3A, ...)

    def evaluate(self, points, keys):
        totals = self.rounds.evaluate(points, SUM_KEYS)
        out = []
        for x, tot in zip(points, totals):
            x = np.asarray(x, float)
            self.seen.append((x, tot))
            out.append(self.pool.pooled_sums(tot, x, order=3 if "d3A" in keys else 2))
        return out

    def finalize(self, point, keys, extra=None):
        point = np.asarray(point, float)
        extra = dict(extra or {})
        if self.seen and "beta_internal" in extra:
            base, tot = min(self.seen, key=lambda s: float(np.sum((s[0] - point) ** 2)))
            moved = self.pool.predicted(tot, point - base) if len(point) else tot
            bv, N = self.pool.shared_modes(moved, point, extra["beta_internal"])
            extra.update({"shared_v": bv, "shared_N": N})
        tot, rep = self.rounds.finalize(point, SUM_KEYS, extra)
        s = self.pool.pooled_sums(tot, point, order=3 if "d3A" in keys else 2)
        parts = {sid: {k: v for k, v in r.items() if k not in SUM_KEYS + ("scols",)} for sid, r in rep.items()}
        if "shared_v" in extra:
            parts[POOLED] = {**s, **self._moved_modes(tot, point, extra, parts)}
        else:
            parts[POOLED] = {**s, **self._shared_modes(tot, point, s)}
        return s, parts

    def _moved_modes(self, tot: dict, point, extra: dict, parts: dict) -> dict:
        """The shared levels' modes and SDs at the final θ with the β̂, σ̂ predicted there (those the sites
        were sent), with their derivatives in (θ, β, σ): in θ central differences along the sums' expansion,
        in β and σ exact (b̂_v = N(G_vy − G_vX β̂), the SDs σ √diag N).  The sites' local modes, given the
        shared ones sent (from the sums of the round before), are moved to these and chained through them, so
        that every mode moves to the estimate along the same step as θ, β and σ (scotssec over 3 sites: 4e-5
        off the pooled fit before)."""
        beta, sigma = np.asarray(extra["beta_internal"], float), float(extra["sigma"])
        k, p, Q = len(point), self.pool.p, self.layout.Q
        bv, N = self.pool.shared_modes(tot, point, beta)
        sd = sigma * np.sqrt(np.maximum(np.diag(N), 0.0))
        dbv, dsd, dN = np.zeros((Q, k + p + 1)), np.zeros((Q, k + p + 1)), []
        for t in range(k):
            h = 1e-5 * (1.0 + abs(point[t]))
            e = np.zeros(k)
            e[t] = h
            (bp, Np), (bm, Nm) = (self.pool.shared_modes(self.pool.predicted(tot, d), point + d, beta) for d in (e, -e))
            dbv[:, t], dN = (bp - bm) / (2.0 * h), dN + [(Np - Nm) / (2.0 * h)]
            dsd[:, t] = sigma * (np.sqrt(np.maximum(np.diag(Np), 0.0)) - np.sqrt(np.maximum(np.diag(Nm), 0.0))) / (2.0 * h)
        dbv[:, k:k + p] = -N @ tot["sG"][:Q, Q:Q + p]
        dsd[:, -1] = sd / sigma if sigma > 0 else 0.0
        # the sites' local modes: from the shared modes sent to these, then in (θ, β, σ) through them; their
        # SDs σ √diag(Λ(S + R N Rᵀ)Λᵀ) with this N instead of the one sent, and N's change in θ added
        dNs = N - np.asarray(extra["shared_N"], float)
        for part, f, dv, cols in local_moves(parts, k, bv - np.asarray(extra["shared_v"], float), dbv):
            ix = np.ix_(cols, cols)                             # (dv: −Λ R over the site's shared columns)
            quad = lambda A: sigma ** 2 * np.einsum("gaq,qr,gar->ga", dv, A[ix], dv)    # noqa: E731
            sdl = np.sqrt(np.maximum(np.asarray(part["condsd"][f], float) ** 2 + quad(dNs), 0.0))
            ds = np.delete(np.asarray(part["dcondsd"][f], float), np.s_[k:k + len(cols)], axis=-1)
            for t in range(k):
                ds[..., t] += np.where(sdl > 0, quad(dN[t]) / (2.0 * np.where(sdl > 0, sdl, 1.0)), 0.0)
            ds[..., -1] = sdl / sigma if sigma > 0 else 0.0
            part["condsd"][f], part["dcondsd"][f] = sdl, ds
        out = by_factor(self.layout, self.zcols, bv, sd)
        out["dmodes"] = by_factor(self.layout, self.zcols, dbv, dbv)["modes"]
        out["dcondsd"] = by_factor(self.layout, self.zcols, dsd, dsd)["modes"]
        return out

    def _shared_modes(self, tot: dict, point, s: dict) -> dict:
        """The shared levels' modes and SDs, by factor (empty for factors without shared levels)."""
        pr = profiled_deviance(s, self.reml, order=0)
        bv, N = self.pool.shared_modes(tot, point, pr.beta)
        return by_factor(self.layout, self.zcols, bv, np.sqrt(pr.sigma2 * np.maximum(np.diag(N), 0.0)))


def local_moves(parts: dict, at: int, shift: np.ndarray, D: np.ndarray) -> list:
    """The sites' local modes, sent with their derivatives in the site's own parameters -- among them, from
    position ``at``, its shared columns (``dcols``) of the shared effects b̂_v -- moved in place by
    ``shift`` (b̂_v less the b̂_v they were computed at) and given derivatives in the coordinator's
    parameters through b̂_v's (``D``, Q × P), with which the coordinator moves them to its estimate.
    Returns (part, factor, the derivatives in b̂_v's columns, those columns) for each factor moved."""
    moved = []
    for part in parts.values():
        cols = part.pop("dcols", None)
        if cols is None or "dmodes" not in part:
            continue
        cols = np.asarray(cols, dtype=np.int64)
        block = np.s_[at:at + len(cols)]
        for f, dm in part["dmodes"].items():
            dm = np.asarray(dm, float)
            dv = dm[..., block]
            part["modes"][f] = np.asarray(part["modes"][f], float) + dv @ shift[cols]
            part["dmodes"][f] = np.delete(dm, block, axis=-1) + dv @ D[cols]
            moved.append((part, f, dv, cols))
    return moved
