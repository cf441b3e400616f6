"""Moment algebra (provisional copy; replaced by the pseudo-data split)."""
from __future__ import annotations

import itertools

import numpy as np


def monomials(d: int, order: int) -> np.ndarray:
    d, order = int(d), int(order)
    if d < 0 or order < 0:
        raise ValueError("d and order must be non-negative")
    rows = []
    for deg in range(order + 1):
        for combo in itertools.combinations_with_replacement(range(d), deg):
            e = [0] * d
            for k in combo:
                e[k] += 1
            rows.append(e)
    return np.array(rows, dtype=np.int64).reshape(len(rows), d)


def mono_values(V: np.ndarray, expo: np.ndarray) -> np.ndarray:
    n, d = V.shape
    out = np.ones((n, expo.shape[0]))
    if expo.size == 0 or n == 0:
        return out
    top = int(expo.max())
    powers = np.arange(top + 1)
    for k in range(d):
        ek = expo[:, k]
        if not ek.any():
            continue
        out *= (V[:, k, None] ** powers)[:, ek]
    return out
