"""Structure read off the target moments: validation of the monomial set, the standardised coding of the
variables (targets transformed alongside), and columns that are exact polynomials of the others."""
from __future__ import annotations

import itertools
import math

import numpy as np

from ...model.moments import monomials, unit

_REL = 1e-10      # relative size below which a sum of squares read off the moments counts as zero


def _check_expo(expo) -> np.ndarray:
    """``expo`` as an int64 array, checked: integer, non-negative, no repeats, every monomial of degree ≤ 2."""
    expo = np.asarray(expo)
    if expo.ndim != 2 or not np.issubdtype(expo.dtype, np.integer) and not np.all(expo == np.round(expo)):
        raise ValueError("expo must be a 2-D array of integer exponents")
    expo = expo.astype(np.int64)
    if (expo < 0).any():
        raise ValueError("expo has negative exponents")
    if len({tuple(r) for r in expo}) != len(expo):
        raise ValueError("expo has repeated monomials")
    have = {tuple(r) for r in expo}
    missing = [tuple(r) for r in monomials(expo.shape[1], 2) if tuple(r) not in have]
    if missing:
        raise ValueError(f"expo must contain every monomial of degree ≤ 2; missing e.g. {missing[0]}")
    return expo


def _closed(expo: np.ndarray) -> bool:
    """Whether lowering any exponent of any monomial by one gives a monomial of ``expo`` again."""
    have = {tuple(r) for r in expo}
    for e in expo:
        for k in np.flatnonzero(e):
            f = e.copy()
            f[k] -= 1
            if tuple(f) not in have:
                return False
    return True


def _standardise(n, expo, target, coding, closed):
    """Per-variable affine coding x = loc + sc · x' and the targets t' of x' (binomial expansion).

    ``coding[k] = (loc, sc)`` is given for the binary variables (their 0/1 coding); the others are centred
    and scaled by their target mean and SD (a constant variable gets sc = 1).  Centring needs every lower
    monomial (``closed``); otherwise the variables are only scaled by their root mean square (binaries
    must then be coded 0/1)."""
    d = expo.shape[1]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    loc, sc = np.zeros(d), np.ones(d)
    const = np.zeros(d, dtype=bool)
    for k in range(d):
        if k in coding:
            loc[k], sc[k] = coding[k]
            continue
        m1 = target[idx[unit(d, k)]] / n
        m2 = target[idx[unit(d, k, k)]] / n
        var = m2 - m1 * m1
        loc[k] = m1
        if var > 1e-12 * max(m2, 1e-300):
            sc[k] = math.sqrt(var)
        else:
            const[k] = True
        if not closed:
            loc[k], sc[k] = 0.0, (math.sqrt(m2) if m2 > 0 else 1.0)
    ts = np.zeros(len(expo))
    for m, e in enumerate(expo):
        ranges = [range(e[k] + 1) if loc[k] != 0.0 else (int(e[k]),) for k in range(d)]
        acc = 0.0
        for f in itertools.product(*ranges):
            coef = 1.0
            for k in range(d):
                if e[k] != f[k]:
                    coef *= math.comb(int(e[k]), int(f[k])) * (-loc[k]) ** int(e[k] - f[k])
            acc += coef * target[idx[f]]
        ts[m] = acc / float(np.prod(sc ** e))
    return loc, sc, const, ts


def _phi(R: list[int], bins: set, d: int, quad: bool) -> np.ndarray:
    """Exponents of the regressors 1, x_r, (x_r x_s) over the columns R (b² = b is left out)."""
    rows = [[0] * d]
    for r in R:
        rows.append(list(unit(d, r)))
    if quad:
        for i, r in enumerate(R):
            for s_ in R[i:]:
                if r == s_ and r in bins:
                    continue
                rows.append(list(unit(d, r, s_)))
    return np.array(rows, dtype=np.int64).reshape(len(rows), d)


def _find_derived(n, expo, ts, bins, candidates, pool):
    """Columns that are exact polynomials (degree ≤ 2 when the moments reach degree 4, else affine) of the
    other columns, read off the targets by a least-squares regression on moments: w is derived when
    Σ(w − φβ)² = Σw² − cᵀβ is zero to rounding.  Later columns are tried first (a square or interaction
    is derived from its main effects, not the other way round).  Returns [(w, φ exponents, β)] in the
    order found; evaluate them in the reverse order."""
    d = expo.shape[1]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    pool = set(pool)
    found = []
    for w in sorted(candidates, reverse=True):
        R = sorted(pool - {w})
        ew = np.array(unit(d, w))
        sww_i = idx.get(tuple(2 * ew))
        if sww_i is None or ts[sww_i] <= 0:
            continue
        for quad in (True, False):
            phi = _phi(R, bins, d, quad)
            if n < 2 * len(phi):
                continue
            hi = [[idx.get(tuple(a + b)) for b in phi] for a in phi]
            ci = [idx.get(tuple(a + ew)) for a in phi]
            if any(j is None for row in hi for j in row) or any(j is None for j in ci):
                continue
            H = ts[np.array(hi)]
            c = ts[np.array(ci)]
            dg = np.diag(H).copy()
            keep = dg > 1e-12 * n
            phi, H, c, dg = phi[keep], H[np.ix_(keep, keep)], c[keep], dg[keep]
            D = np.sqrt(dg)
            beta = np.linalg.lstsq(H / np.outer(D, D), c / D, rcond=1e-10)[0]
            sww = ts[sww_i]
            rss = sww - float((c / D) @ beta)
            if rss <= _REL * sww:
                keep = np.abs(beta) > 1e-9 * np.abs(beta).max()      # drop rounding-level coefficients
                found.append((w, phi[keep], (beta / D)[keep]))
                pool.discard(w)
            break                                     # the quadratic fit includes the affine one
    return found
