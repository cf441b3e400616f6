"""Binary variables of the pseudo data: their exact 0/1 block from the joint counts the moments give (cell
counts by Möbius inversion or an integer program), and the detection of two-valued variables."""
from __future__ import annotations

import math

import numpy as np

from ...model.moments import binary_masks
from .structure import _REL


def _cell_counts(n: int, p: int, counts: dict[int, int], time_limit: float) -> np.ndarray | None:
    """Non-negative integer counts c_T of the 2**p cells (patterns T of p binaries) with
    Σ_{T ⊇ S} c_T = N_S for every known joint count N_S (``counts``: bitmask S → N_S; S = 0 is n).

    All subsets known (p ≤ K): Möbius inversion, exact.  Otherwise a feasibility integer program
    (:func:`scipy.optimize.milp`, at most ``time_limit`` seconds).  Targets that no table matches exactly
    (not from real data): the total and the singletons exact, the other counts with least L1 deviation
    (small p only).  None when nothing was found."""
    cells = np.arange(2 ** p)
    if len(counts) == 2 ** p:                                   # determined: Möbius inversion
        c = np.zeros(2 ** p, dtype=np.int64)
        for T in cells:
            for S in cells:
                if S & T == T:
                    c[T] += (-1) ** bin(S ^ T).count("1") * counts[int(S)]
        if np.all(c >= 0):
            return c
    masks = list(counts)
    A = np.array([(cells & s) == s for s in masks], dtype=float)
    b = np.array([counts[s] for s in masks], dtype=float)
    from scipy import optimize      # only here: importing it costs a small fit a tenth of a second

    res = optimize.milp(np.zeros(2 ** p), constraints=optimize.LinearConstraint(A, b, b),
                        integrality=np.ones(2 ** p), bounds=optimize.Bounds(0, n),
                        options={"time_limit": time_limit})
    if res.x is not None:
        c = np.round(res.x).astype(np.int64)
        if np.array_equal(A @ c, b) and np.all(c >= 0):
            return c
    if p > 6:
        return None
    hard = [i for i, s in enumerate(masks) if s == 0 or (s & (s - 1)) == 0]
    soft = [i for i in range(len(masks)) if i not in hard]
    ns, nc = len(soft), 2 ** p
    Aw = np.zeros((len(masks), nc + 2 * ns))
    Aw[:, :nc] = A
    for j, i in enumerate(soft):
        Aw[i, nc + j], Aw[i, nc + ns + j] = 1.0, -1.0
    res = optimize.milp(np.concatenate([np.zeros(nc), np.ones(2 * ns)]),
                        constraints=optimize.LinearConstraint(Aw, b, b),
                        integrality=np.concatenate([np.ones(nc), np.zeros(2 * ns)]),
                        bounds=optimize.Bounds(0, np.concatenate([np.full(nc, float(n)), np.full(2 * ns, np.inf)])),
                        options={"time_limit": time_limit})
    return None if res.x is None else np.round(res.x[:nc]).astype(np.int64)


def _binary_block(n: int, expo: np.ndarray, ts: np.ndarray, bins: list[int],
                  rng: np.random.Generator, time_limit: float = 2.0) -> np.ndarray | None:
    """An exact 0/1 matrix (n, p) for the binary variables ``bins`` (in their 0/1 coding; ``ts`` are the
    targets in that coding), matching their joint counts; None if no cell table was found."""
    p = len(bins)
    if p == 0:
        return np.zeros((n, 0))
    only_bins = np.ones(len(expo), dtype=bool)
    for k in range(expo.shape[1]):
        if k not in bins:
            only_bins &= expo[:, k] == 0
    masks = binary_masks(expo, bins)
    counts: dict[int, int] = {}
    for m in np.flatnonzero(only_bins):         # degree order: the multilinear monomial of a support first
        s = int(masks[m])
        if s not in counts:
            counts[s] = int(min(max(round(float(ts[m])), 0), n))
    counts[0] = n
    cells = _cell_counts(n, p, counts, time_limit)
    if cells is None:
        return None
    U = np.repeat((np.arange(2 ** p)[:, None] >> np.arange(p)) & 1, cells, axis=0).astype(float)
    return U[rng.permutation(n)]


def _two_values(n, s1, s2, s3, s4):
    """If a variable with these raw moment sums takes at most two values (Pearson: kurtosis = skew² + 1),
    return them (a < b); else None."""
    mu = s1 / n
    var = s2 / n - mu * mu
    if var <= _REL * max(s2 / n, 1e-300):
        return None
    sd = math.sqrt(var)
    m3 = (s3 / n - 3 * mu * s2 / n + 2 * mu ** 3) / sd ** 3          # skewness
    m4 = (s4 / n - 4 * mu * s3 / n + 6 * mu * mu * s2 / n - 3 * mu ** 4) / sd ** 4   # kurtosis
    if m4 - m3 * m3 - 1.0 > 1e3 * _REL * max(m4, 1.0):
        return None
    r = math.sqrt(m3 * m3 + 4.0)
    a, b = mu + sd * (m3 - r) / 2, mu + sd * (m3 + r) / 2
    for v in ("a", "b"):                        # snap values within rounding of an integer (0/1 dummies)
        x = a if v == "a" else b
        if abs(x - round(x)) <= 1e-7 * (b - a):
            if v == "a":
                a = float(round(x))
            else:
                b = float(round(x))
    return a, b
