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

    def evaluate(self, points, keys):
        totals = self.rounds.evaluate(points, SUM_KEYS)
        out = []
        for x, tot in zip(points, totals):
            x = np.asarray(x, float)
            self.seen.append((x, tot))
            out.append(self.pool.pooled_sums(tot, x))
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
        s = self.pool.pooled_sums(tot, point)
        parts = {sid: {k: v for k, v in r.items() if k not in SUM_KEYS + ("scols",)} for sid, r in rep.items()}
        parts[POOLED] = {**s, **self._shared_modes(tot, point, s)}
        return s, parts

    def _shared_modes(self, tot: dict, point, s: dict) -> dict:
        """The shared levels' modes and SDs, by factor (empty for factors without shared levels)."""
        pr = profiled_deviance(s, self.reml, order=0)
        bv, N = self.pool.shared_modes(tot, point, pr.beta)
        return by_factor(self.layout, self.zcols, bv, np.sqrt(pr.sigma2 * np.maximum(np.diag(N), 0.0)))
