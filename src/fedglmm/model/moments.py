"""Moment algebra shared by sites and coordinator: the monomials ``Π_k v_k ** e_k`` of a model's variables,
their values and sums over rows, and the relative error of a set of sums against targets."""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

__all__ = ["monomials", "mono_values", "moment_sums", "relative_errors", "unit", "support_counts",
           "binary_masks"]

_CHUNK = 4096          # rows per block when forming monomial values (bounds the memory of moment_sums)


def monomials(d: int, order: int) -> np.ndarray:
    """All exponent vectors ``e ∈ ℕ^d`` with ``0 ≤ |e| ≤ order`` as an ``(M, d)`` int array.

    Order: by degree (degree 0 first, then 1, ...); within a degree, lexicographic in the sorted tuple of
    variable indices ``(i1 ≤ i2 ≤ ... )`` -- the order of
    ``itertools.combinations_with_replacement(range(d), degree)`` -- which is *descending* lexicographic
    order of the exponent vectors.  For ``d = 3, order = 2``::

        1, v0, v1, v2, v0², v0v1, v0v2, v1², v1v2, v2²

    ``M = C(d + order, order)``.
    """
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
    """``(n, M)`` values ``Π_k V[i, k] ** expo[m, k]`` (``0 ** 0 = 1``)."""
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


def moment_sums(V: np.ndarray, expo: np.ndarray) -> np.ndarray:
    """``Σ_rows Π_k V[:, k] ** expo[m, k]`` for every monomial ``m``: shape ``(M,)``.  ``V`` is ``(n, d)``."""
    V = np.asarray(V, dtype=float)
    expo = np.asarray(expo, dtype=np.int64)
    if V.ndim != 2 or expo.ndim != 2 or V.shape[1] != expo.shape[1]:
        raise ValueError(f"V {V.shape} and expo {expo.shape} must be (n, d) and (M, d)")
    out = np.zeros(expo.shape[0])
    for a in range(0, V.shape[0], _CHUNK):
        out += mono_values(V[a:a + _CHUNK], expo).sum(axis=0)
    return out


def unit(d, *ks) -> tuple:
    """The exponent tuple of the monomial ``Π v_k`` over ``ks`` (repeats raise the power) in ``d`` variables."""
    e = [0] * d
    for k in ks:
        e[k] += 1
    return tuple(e)


def support_counts(B: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """For each bitmask over the columns of B: number of rows whose masked binaries are all 1."""
    p = B.shape[1]
    if p == 0:
        return np.full(len(masks), float(B.shape[0]))
    rowmask = (B.astype(np.int64) << np.arange(p)).sum(axis=1)
    return np.array([np.count_nonzero((rowmask & s) == s) for s in masks], dtype=float)


def binary_masks(expo: np.ndarray, bins: list[int]) -> np.ndarray:
    """Bitmask (over ``bins``) of the binary support of each monomial."""
    mask = np.zeros(len(expo), dtype=np.int64)
    for j, k in enumerate(bins):
        mask |= (expo[:, k] > 0).astype(np.int64) << j
    return mask


def relative_errors(V: np.ndarray, expo, target, *, binary: Sequence[int] = ()) -> np.ndarray:
    """Per-monomial relative error of ``moment_sums(V, expo)`` against ``target``.

    For monomial ``m`` (exponents ``e``, 0/1-binary support ``S`` over the ``binary`` columns) it is
    ``|Σ_rows monomial − target_m| / max(|target_m|, N_S · Π_{k other} rms_k ** e_k)`` with
    ``rms_k = sqrt(target[2 e_k] / n)`` and ``N_S`` the number of rows whose binaries in ``S`` are all 1
    (``N_∅ = n``): a monomial whose target happens to be near 0 (an odd moment of a centred variable) is
    measured against the size its summands have, not against its own near-zero value."""
    V = np.asarray(V, dtype=float)
    expo = np.asarray(expo, dtype=np.int64)
    target = np.asarray(target, dtype=float)
    n, d = V.shape
    bins = [k for k in dict.fromkeys(int(b) for b in binary)]
    real = [k for k in range(d) if k not in bins]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    scale = support_counts(V[:, bins], binary_masks(expo, bins)) if bins else np.full(len(expo), float(n))
    for k in real:
        m2 = idx.get(unit(d, k, k))
        rms = math.sqrt(max(target[m2], 0.0) / n) if (m2 is not None and n > 0) else 1.0
        scale = scale * rms ** expo[:, k]
    scale = np.maximum(np.maximum(np.abs(target), scale), 1e-300)
    return np.abs(moment_sums(V, expo) - target) / scale
