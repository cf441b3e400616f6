"""Per-group moment sums of a site's variables (the one-shot message), without per-row temporaries.

The sums are Σ_{rows of g} Π_k v_k^{e_k} for every exponent vector e of :func:`fedglmm.model.moments.monomials`
(v_0 the outcome).  numpy forms an n × M table of monomial values first (M = 36 for six covariates at
order 2); for a large site (at least :func:`fedglmm.likelihood.fused.min_rows` rows, numba importable;
:func:`fedglmm.site.summaries` decides) this compiled loop builds each row's monomials from those of lower degree (one product each) and adds them to
its group's sums, so memory stays at the G × M result.  Both give the same sums up to rounding.

A cbind row stands for its trials as Bernoulli observations: the outcome's powers are then y for e_0 > 0
and the trials m for e_0 = 0 (see :func:`fedglmm.site.summaries`).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _sums(V, y, m, starts, ends, upar, uvar, xidx, e0, bernoulli, out):
    nu, M = len(upar), len(xidx)
    uval = np.empty(nu)
    for g in range(len(starts)):
        for j in range(starts[g], ends[g]):
            uval[0] = 1.0
            for i in range(1, nu):
                uval[i] = uval[upar[i]] * V[j, uvar[i]]
            for k in range(M):
                if bernoulli:
                    f = 1.0
                    for _ in range(e0[k]):
                        f *= y[j]
                else:
                    f = y[j] if e0[k] > 0 else m[j]
                out[g, k] += uval[xidx[k]] * f


def group_moments(V: np.ndarray, y: np.ndarray, trials: np.ndarray, starts: np.ndarray, expo: np.ndarray,
                  bernoulli: bool) -> np.ndarray | None:
    """(G, M) moment sums per group (rows sorted by group, groups starting at ``starts``; ``V`` the
    covariates without the outcome, ``expo`` over (outcome, covariates))."""
    xe = [tuple(e[1:]) for e in expo]
    units = sorted(set(xe), key=lambda e: (sum(e), tuple(-v for v in e)))
    index = {e: i for i, e in enumerate(units)}
    upar, uvar = np.zeros(len(units), np.int64), np.zeros(len(units), np.int64)
    for i, e in enumerate(units[1:], start=1):          # each monomial = a lower one times one variable
        k = next(k for k, v in enumerate(e) if v > 0)
        parent = list(e)
        parent[k] -= 1
        upar[i], uvar[i] = index[tuple(parent)], k
    starts = np.asarray(starts, np.int64)
    ends = np.append(starts[1:], len(y)).astype(np.int64)
    out = np.zeros((len(starts), len(expo)))
    _sums(np.ascontiguousarray(V, dtype=float), np.asarray(y, float), np.asarray(trials, float), starts, ends,
          upar, uvar, np.array([index[e] for e in xe], np.int64), np.asarray(expo[:, 0], np.int64), bernoulli, out)
    return out
