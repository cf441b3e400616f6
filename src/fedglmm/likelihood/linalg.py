"""Stacked small linear algebra over groups: one q×q problem per group, solved for all groups at once.

For a scalar random effect (q = 1, the common case) plain arithmetic, which avoids numpy.linalg's
per-call overhead on many tiny problems.  And a third-derivative tensor carried through a linear map
(:func:`transform_third`).
"""
from __future__ import annotations

import numpy as np


def solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return b / a if a.shape[-1] == 1 else np.linalg.solve(a, b)


def inv(a: np.ndarray) -> np.ndarray:
    return 1.0 / a if a.shape[-1] == 1 else np.linalg.inv(a)


def chol(a: np.ndarray) -> np.ndarray:
    return np.sqrt(a) if a.shape[-1] == 1 else np.linalg.cholesky(a)


def upper_half(a: np.ndarray) -> np.ndarray:
    """Φ(A): the upper triangle of each trailing q×q matrix with its diagonal halved."""
    out = np.triu(a)
    idx = np.arange(a.shape[-1])
    out[..., idx, idx] *= 0.5
    return out


def transform_third(D: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Σ_ijk D_ijk M_ia M_jb M_kc: a symmetric third-derivative tensor carried through the linear map M, one
    index at a time (k³·(k + m) work; the four-operand einsum without a contraction path is k⁶: with a
    40-level factor, k = 42, it took 22 s per tensor)."""
    out = np.tensordot(D, M, axes=([0], [0]))             # (j, k, a)
    out = np.tensordot(out, M, axes=([0], [0]))           # (k, a, b)
    return np.tensordot(out, M, axes=([0], [0]))          # (a, b, c)


_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))     # the orders of three indices


def symmetric_third(D: np.ndarray) -> np.ndarray:
    """The mean of D over the six orders of its indices: finite differences of a Hessian made a symmetric
    third-derivative tensor."""
    return sum(D.transpose(pm) for pm in _ORDERS) / 6.0


def _third_index(n: int) -> tuple:
    """The positions (i, j, k), i ≤ j ≤ k, of an n × n × n tensor's distinct entries, in a fixed order."""
    i, j, k = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    keep = (i <= j) & (j <= k)
    return i[keep], j[keep], k[keep]


def pack_third(T: np.ndarray) -> np.ndarray:
    """The n(n + 1)(n + 2)/6 distinct entries T[i, j, k], i ≤ j ≤ k, of a symmetric n × n × n tensor (what a
    site sends: a sixth of the tensor's size as n grows)."""
    return np.asarray(T, float)[_third_index(len(T))]


def unpack_third(v: np.ndarray, n: int) -> np.ndarray | None:
    """The symmetric n × n × n tensor of :func:`pack_third`'s entries, or None if ``v`` has not their number."""
    idx = _third_index(n)
    v = np.asarray(v, float).ravel()
    if v.shape != (len(idx[0]),):
        return None
    T = np.zeros((n, n, n))
    for a, b, c in _ORDERS:
        T[idx[a], idx[b], idx[c]] = v
    return T
