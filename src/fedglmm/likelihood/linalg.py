"""Stacked small linear algebra over groups: one q×q problem per group, solved for all groups at once.

For a scalar random effect (q = 1, the common case) plain arithmetic, which avoids numpy.linalg's
per-call overhead on many tiny problems.
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
