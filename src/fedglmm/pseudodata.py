"""Pseudo-data whose moment sums match given targets: the generator of the one-shot method.

In the one-shot method each site sends, once, for every group: the group size and the raw moment sums
``Σ_rows Π_k v_k ** e_k`` of its variables for all exponent vectors ``e`` with ``|e| ≤ K``.  The
coordinator generates, group by group, pseudo rows whose moment sums equal those targets, and fits the
model to the pseudo rows.  This module is that generator; it knows nothing about what the variables mean.
Variables (columns of ``V``) are numbered ``0 .. d-1``; in the one-shot method column 0 is the outcome
and the rest are the design columns without the intercept.

How a group is generated (:func:`generate_group`)
-------------------------------------------------
Internally every variable is centred and scaled by its target mean and SD (binaries: their 0/1 coding);
the targets are transformed alongside (binomial expansion; needs ``expo`` closed under lowering an
exponent, as ``monomials(d, K)`` is -- otherwise variables are only scaled).

1. **Structure read off the moments.**  Some relations between columns are forced by the moments, and
   leaving such a column as a free unknown puts the solution on a singular point of the equations
   (Gauss-Newton then crawls; accuracy stalls near 1e-6).  So, before solving:

   * *binary*: the declared ``binary`` variables; and, when ``K ≥ 4``, any variable whose moments satisfy
     Pearson's bound with equality (kurtosis = skewness² + 1): it takes exactly two values in the data
     and in every solution (0/1 dummies not declared binary, ±1 codings, a dose with two levels);
   * *constant*: zero variance (a group-level covariate is constant within its group);
   * *derived*: a column that is an exact polynomial of the other columns -- affine (collinear columns;
     any K), or of degree 2 when ``K ≥ 4`` (squares such as age², interactions x·z, x1·x2): found by a
     least-squares regression on the moments (``Σ(w − φβ)² = Σw² − cᵀβ`` is zero to rounding; later
     columns are tried first, so age² is derived from age) and computed from the others.  The pseudo
     data keep these relations exactly (the age² column is the square of the age column).

   The remaining real columns are the unknowns (*base* columns).
2. **Binary block.**  Binaries are not unknowns: they are fixed first as an exact 0/1 matrix ``U``.  A
   monomial of binaries depends only on its support ``S`` (``b² = b``): the targets give the joint counts
   ``N_S`` for ``|S| ≤ K``.  Cell counts of the ``2**p`` patterns: Möbius inversion when ``p ≤ K`` (they
   are determined), else a feasibility integer program (:func:`scipy.optimize.milp`, 2 s limit).  If none
   is found, the binaries after the first ``K`` are matched as real variables (``binary_as_real``, with a
   :class:`PseudoDataWarning`); likewise beyond :data:`MAX_BINARY`.  Every variable kept binary has
   exactly ``round(target[e_k])`` ones.
3. **Degrees ≤ 2, closed form.**  With ``Z = [1, U]`` and ``X`` the base columns, the targets give
   ``ZᵀX`` and ``XᵀX``.  Write ``X = Zβ + E`` with ``ZᵀE = 0``: ``β = (ZᵀZ)⁺ZᵀX`` and
   ``EᵀE = W = XᵀX − βᵀZᵀZβ``.  ``E`` is standard normal noise with the columns of ``Z`` projected out,
   orthonormalised (thin SVD: rank deficiency when ``n`` is small is handled) and multiplied by a square
   root of ``W``.  With one binary outcome ``y`` this is: two subgroups (``y = 1``, ``y = 0``), each
   centred on its known mean, pooled within-subgroup covariance ``W``.  For ``K = 2`` this is the answer:
   every moment is exact to rounding (unless a ``nonneg`` variable came out negative: then step 4 runs).
4. **Degrees 3 .. K, nonlinear least squares.**  Every monomial of ``expo`` is expanded into a
   polynomial of the base and binary variables, giving a linear system ``A s = t'`` in the sums ``s`` of
   the distinct *effective* monomials (a derived column raises the degree: Σ(age²)⁴ is a degree-8 moment
   of age).  It is solved once for ``s*`` (SVD); the rows are then found by nonlinear least squares on
   ``(Σ_rows effective monomial − s*) / scale`` -- well conditioned, and free of the duplicate equations
   of the raw system (``y² x = y x``, ``age2 · x = age² · x``).  (If some sums are not identified
   individually, the residuals are the identified combinations.)  The unknowns are the ``n × q`` base
   entries; the solver is Levenberg-Marquardt with an analytic, vectorised Jacobian and the minimum-norm
   step ``δ = −Jᵀ(JJᵀ + μI)⁻¹r`` when there are more unknowns than equations (an ``n_eq × n_eq``
   Cholesky per step); ``nonneg`` entries are parametrised as ``lb + u²``.
   :func:`scipy.optimize.least_squares` (``trf``) is available as ``solver="scipy"``: same answers, but
   its SVD of the wide Jacobian per iteration makes it 7-20× slower (2-5 s instead of 0.3 s for 200 rows,
   d = 8, K = 4).  Afterwards
   the degree-≤2 moments of the base columns are restored exactly by the affine map of ``E`` closest to
   the identity, when that does not increase the error and keeps the bounds.  If the error is above
   ``tol`` the step is restarted from a fresh normal draw (``max_tries``) and the best result is kept.

Small groups: over-determination and disclosure
-----------------------------------------------
The per-group diagnostics report ``unknowns`` (``n × q``) and ``equations`` (identified effective
moments).  When ``unknowns < equations`` the moments generically determine the rows up to their order,
and the least squares usually finds exactly those: the "pseudo" rows are then the real rows (to ~1e-13;
e.g. 20 rows of 4 real variables and K = 4).  That is a property of the summaries, not of this generator
-- a site sending K-th order moments of a small group discloses the group's rows -- but it matters for
the one-shot method's privacy claims.  When the least squares does not find them, the error is reported,
never hidden.

Relative error
--------------
The error reported for monomial ``m`` (exponents ``e``, 0/1-binary support ``S``) is
``|Σ_rows monomial − target_m| / max(|target_m|, N_S · Π_{k other} rms_k ** e_k)`` with
``rms_k = sqrt(target[2 e_k] / n)`` and ``N_S`` the number of rows whose binaries in ``S`` are all 1
(``N_∅ = n``): a monomial whose target happens to be near 0 (an odd moment of a centred variable) is
measured against the size its summands have, not against its own near-zero value.
"""
from __future__ import annotations

import inspect
import itertools
import math
import time
import warnings
from typing import Sequence

import numpy as np
from scipy import optimize

__all__ = ["monomials", "moment_sums", "generate_group", "generate", "relative_errors",
           "PseudoDataWarning", "MAX_BINARY"]

#: Binary variables kept exactly 0/1 at most (the cell integer program has ``2 ** MAX_BINARY`` unknowns).
MAX_BINARY = 10

_CHUNK = 4096          # rows per block when forming monomial values (bounds the memory of moment_sums)
_HAS_CALLBACK = "callback" in inspect.signature(optimize.least_squares).parameters


class PseudoDataWarning(UserWarning):
    """A requested property of the pseudo data could not be honoured exactly."""


# ----------------------------------------------------------------------------------------------------------
# monomials and their sums
# ----------------------------------------------------------------------------------------------------------

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


def _mono_values(V: np.ndarray, expo: np.ndarray) -> np.ndarray:
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
        out += _mono_values(V[a:a + _CHUNK], expo).sum(axis=0)
    return out


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def _check_expo(expo, d=None) -> np.ndarray:
    expo = np.asarray(expo)
    if expo.ndim != 2 or not np.issubdtype(expo.dtype, np.integer) and not np.all(expo == np.round(expo)):
        raise ValueError("expo must be a 2-D array of integer exponents")
    expo = expo.astype(np.int64)
    if (expo < 0).any():
        raise ValueError("expo has negative exponents")
    if d is not None and expo.shape[1] != d:
        raise ValueError(f"expo has {expo.shape[1]} columns, expected {d}")
    if len({tuple(r) for r in expo}) != len(expo):
        raise ValueError("expo has repeated monomials")
    have = {tuple(r) for r in expo}
    missing = [tuple(r) for r in monomials(expo.shape[1], 2) if tuple(r) not in have]
    if missing:
        raise ValueError(f"expo must contain every monomial of degree ≤ 2; missing e.g. {missing[0]}")
    return expo


def _unit(d, *ks) -> tuple:
    e = [0] * d
    for k in ks:
        e[k] += 1
    return tuple(e)


def _support_counts(B: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """For each bitmask over the columns of B: number of rows whose masked binaries are all 1."""
    p = B.shape[1]
    if p == 0:
        return np.full(len(masks), float(B.shape[0]))
    rowmask = (B.astype(np.int64) << np.arange(p)).sum(axis=1)
    return np.array([np.count_nonzero((rowmask & s) == s) for s in masks], dtype=float)


def _binary_masks(expo: np.ndarray, bins: list[int]) -> np.ndarray:
    """Bitmask (over ``bins``) of the binary support of each monomial."""
    mask = np.zeros(len(expo), dtype=np.int64)
    for j, k in enumerate(bins):
        mask |= (expo[:, k] > 0).astype(np.int64) << j
    return mask


def relative_errors(V: np.ndarray, expo, target, *, binary: Sequence[int] = ()) -> np.ndarray:
    """Per-monomial relative error of ``moment_sums(V, expo)`` against ``target`` (see module docstring)."""
    V = np.asarray(V, dtype=float)
    expo = np.asarray(expo, dtype=np.int64)
    target = np.asarray(target, dtype=float)
    n, d = V.shape
    bins = [k for k in dict.fromkeys(int(b) for b in binary)]
    real = [k for k in range(d) if k not in bins]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    scale = _support_counts(V[:, bins], _binary_masks(expo, bins)) if bins else np.full(len(expo), float(n))
    for k in real:
        m2 = idx.get(_unit(d, k, k))
        rms = math.sqrt(max(target[m2], 0.0) / n) if (m2 is not None and n > 0) else 1.0
        scale = scale * rms ** expo[:, k]
    scale = np.maximum(np.maximum(np.abs(target), scale), 1e-300)
    return np.abs(moment_sums(V, expo) - target) / scale


# ----------------------------------------------------------------------------------------------------------
# step 1: the binary block
# ----------------------------------------------------------------------------------------------------------

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
    masks = _binary_masks(expo, bins)
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


# ----------------------------------------------------------------------------------------------------------
# structure read off the moments
# ----------------------------------------------------------------------------------------------------------

_REL = 1e-10      # relative size below which a sum of squares read off the moments counts as zero


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
        m1 = target[idx[_unit(d, k)]] / n
        m2 = target[idx[_unit(d, k, k)]] / n
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
        rows.append(list(_unit(d, r)))
    if quad:
        for i, r in enumerate(R):
            for s_ in R[i:]:
                if r == s_ and r in bins:
                    continue
                rows.append(list(_unit(d, r, s_)))
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
        ew = np.array(_unit(d, w))
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


# ----------------------------------------------------------------------------------------------------------
# one group
# ----------------------------------------------------------------------------------------------------------

def _psd_factor(W: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """L with L Lᵀ = W (its PSD part): columns for eigenvalues above rtol × largest, largest first."""
    lam, Q = np.linalg.eigh((W + W.T) / 2)
    lam, Q = lam[::-1], Q[:, ::-1]
    keep = lam > rtol * max(lam[0], 0.0) if lam.size else np.zeros(0, bool)
    return Q[:, keep] * np.sqrt(lam[keep])


def _sym_pow(S: np.ndarray, power: float) -> np.ndarray:
    lam, Q = np.linalg.eigh((S + S.T) / 2)
    return (Q * lam ** power) @ Q.T


def _poly_mul(p: dict, q: dict, cap: np.ndarray) -> dict:
    """Product of two polynomials {exponent tuple: coefficient}; binary exponents capped at 1 (b² = b)."""
    out: dict = {}
    for e1, c1 in p.items():
        for e2, c2 in q.items():
            e = tuple(min(a + b, 1) if cp else a + b for a, b, cp in zip(e1, e2, cap))
            out[e] = out.get(e, 0.0) + c1 * c2
    return out


class _Group:
    """One group in internal coordinates x' (binaries: their 0/1 coding u; others centred and scaled).

    Columns are of four kinds: binary (the fixed 0/1 block U), constant (x' = 0), derived (an exact
    polynomial of other columns, found by :func:`_find_derived`) and base (the unknowns).  Every monomial
    of ``expo`` is expanded into a polynomial of the base and binary variables: the targets become a linear
    system ``A s = t'`` in the sums ``s`` of the distinct *effective* monomials (derived columns raise the
    degree: age² as a column makes Σ(age²)⁴ a degree-8 moment of age).  That system is solved for ``s*``
    once (least squares, SVD); the nonlinear least squares then matches ``Σ_rows effective monomial = s*``
    -- well conditioned and free of the duplicate equations (b² = b, age² · x = age2 · x) that the raw
    system has."""

    def __init__(self, n, expo, target, declared, nonneg, rng):
        self.n, self.expo, self.target = n, expo, target
        d = self.d = expo.shape[1]
        idx = {tuple(r): m for m, r in enumerate(expo)}
        K = int(expo.sum(axis=1).max())
        closed = _closed(expo)
        # -- binary variables: declared (0/1), then any variable the moments force to two values (K ≥ 4)
        coding = {k: (0.0, 1.0) for k in declared[:MAX_BINARY]}
        self.as_real = list(declared[MAX_BINARY:])
        if K >= 4:
            for k in range(d):
                if k in coding or k in self.as_real:
                    continue
                mom = [idx.get(_unit(d, *([k] * j))) for j in range(1, 5)]
                if any(m is None for m in mom):
                    continue
                ab = _two_values(n, *(float(target[m]) for m in mom))
                if ab is not None and (closed or ab == (0.0, 1.0)):
                    if len(coding) >= MAX_BINARY:
                        self.as_real.append(k)
                        continue
                    coding[k] = (ab[0], ab[1] - ab[0])
        while True:
            self.bins = list(coding)
            self.loc, self.sc, const, self.ts = _standardise(n, expo, target, coding, closed)
            self.U = _binary_block(n, expo, self.ts, self.bins, rng)
            if self.U is not None:
                break
            # no cell table found in time: keep the first K binaries (their cells are determined)
            keep = min(K, len(self.bins) - 1)
            self.as_real += self.bins[keep:]
            coding = {k: coding[k] for k in self.bins[:keep]}
        self.detected = [k for k in self.bins if k not in declared]
        self.binary01 = [k for k in self.bins if coding[k] == (0.0, 1.0)]
        binset = set(self.bins)
        self.const = [k for k in range(d) if const[k] and k not in binset]
        others = [k for k in range(d) if k not in binset and k not in self.const]
        # -- exact polynomial relations (squares, interactions, affine dependence)
        cand = [k for k in others if k not in nonneg]
        if K < 4 and others and self._well_conditioned(others, idx):
            # below order 4 only affine relations can be read off, and there are none when the columns'
            # covariance (given the binaries) is non-singular: skip the search (most groups, most time)
            self.derived = []
        else:
            self.derived = _find_derived(n, expo, self.ts, binset, cand, self.bins + others)[::-1]  # eval order
        dset = {w for w, _, _ in self.derived}
        self.base = [k for k in others if k not in dset]
        q = len(self.base)
        # -- degree ≤ 2 closed form for the base columns: Z = [1, U], X = Zβ + E, EᵀE = W
        self.Z = np.column_stack([np.ones(n), self.U])
        C = np.array([[self.ts[idx[_unit(d, k)]] for k in self.base]]
                     + [[self.ts[idx[_unit(d, j, k)]] for k in self.base] for j in self.bins],
                     dtype=float).reshape(1 + len(self.bins), q)
        G = np.array([[self.ts[idx[_unit(d, k, l)]] for l in self.base] for k in self.base]).reshape(q, q)
        ZtZ_pinv = np.linalg.pinv(self.Z.T @ self.Z, rcond=1e-12, hermitian=True)
        self.beta = ZtZ_pinv @ C
        W = G - C.T @ ZtZ_pinv @ C
        self.W = (W + W.T) / 2
        Uz, sz, _ = np.linalg.svd(self.Z, full_matrices=False)
        self.Qz = Uz[:, sz > 1e-10 * sz[0]]
        self.lower = np.array([(-self.loc[k] / self.sc[k]) if k in nonneg else -np.inf for k in self.base])
        self._effective_system()

    def _well_conditioned(self, cols, idx) -> bool:
        """Whether the within-binary-cell covariance of ``cols`` (from the moments) is clearly non-singular."""
        d = self.d
        Z = np.column_stack([np.ones(self.n), self.U])
        C = np.array([[self.ts[idx[_unit(d, k)]] for k in cols]]
                     + [[self.ts[idx[_unit(d, j, k)]] for k in cols] for j in self.bins],
                     dtype=float).reshape(1 + len(self.bins), len(cols))
        G = np.array([[self.ts[idx[_unit(d, k, l)]] for l in cols] for k in cols]).reshape(len(cols), len(cols))
        W = G - C.T @ np.linalg.pinv(Z.T @ Z, rcond=1e-12, hermitian=True) @ C
        dg = np.diag(W)
        if np.any(dg <= 1e-12 * self.n):
            return False
        R = W / np.sqrt(np.outer(dg, dg))
        return bool(np.linalg.eigvalsh((R + R.T) / 2)[0] > 1e-8)

    def _effective_system(self):
        n, d, expo = self.n, self.d, self.expo
        cap = np.zeros(d, dtype=bool)
        cap[self.bins] = True
        zero = tuple([0] * d)
        poly = {k: {_unit(d, k): 1.0} for k in self.bins + self.base}
        for k in self.const:
            poly[k] = {}
        for w, phi, beta in self.derived:
            pw: dict = {}
            for f, b in zip(phi, beta):
                term = {zero: float(b)}
                for c in np.flatnonzero(f):
                    for _ in range(int(f[c])):
                        term = _poly_mul(term, poly[c], cap)
                for e, v in term.items():
                    pw[e] = pw.get(e, 0.0) + v
            poly[w] = pw
        powers: dict = {}

        def power(c, k):
            if (c, k) not in powers:
                powers[(c, k)] = poly[c] if k == 1 else _poly_mul(power(c, k - 1), poly[c], cap)
            return powers[(c, k)]

        rows = []
        for e in expo:
            p = {zero: 1.0}
            for c in np.flatnonzero(e):
                p = _poly_mul(p, power(c, int(e[c])), cap)
            big = max((abs(v) for v in p.values()), default=0.0)
            rows.append({k: v for k, v in p.items() if abs(v) > 1e-14 * big})
        keys = sorted(set().union(*rows), key=lambda e: (sum(e), tuple(-x for x in e)))
        E = np.array(keys, dtype=np.int64).reshape(len(keys), d)
        col = {k: j for j, k in enumerate(keys)}
        er = np.array([m for m, p in enumerate(rows) for _ in p], dtype=np.int64)       # sparse A: rows,
        ec = np.array([col[k] for p in rows for k in p], dtype=np.int64)               # columns,
        ev = np.array([v for p in rows for v in p.values()], dtype=float)              # values
        Ns_eff = _support_counts(self.U, _binary_masks(E, self.bins))
        moving = (E[:, self.base] > 0).any(axis=1) & (Ns_eff > 0) if self.base else np.zeros(len(E), bool)
        Vfix = np.zeros((n, d))
        Vfix[:, self.bins] = self.U
        S_all = np.zeros(len(E))
        S_all[~moving] = _mono_values(Vfix, E[~moving]).sum(axis=0)
        fixed_e = ~moving[ec]
        b = self.ts - np.bincount(er[fixed_e], weights=ev[fixed_e] * S_all[ec[fixed_e]], minlength=len(expo))
        Em = E[moving]
        mcol = np.cumsum(moving) - 1                          # column of a moving key among the moving
        colscale = Ns_eff[moving]
        me = moving[ec]
        if np.all(np.bincount(er, minlength=len(expo)) <= 1) and np.all(ev == 1.0):
            # no derived columns: each monomial is one effective monomial (duplicates: b² = b) -- average
            cnt = np.bincount(mcol[ec[me]], minlength=len(Em))
            s_star = np.bincount(mcol[ec[me]], weights=b[er[me]], minlength=len(Em)) / np.maximum(cnt, 1)
            rank = len(Em)
        else:
            rowscale = np.maximum(np.abs(self.ts), _support_counts(self.U, _binary_masks(expo, self.bins)))
            rowscale = np.maximum(rowscale, 1e-300)
            Ah = np.zeros((len(expo), len(Em)))
            np.add.at(Ah, (er[me], mcol[ec[me]]), ev[me])
            Ah *= colscale[None, :] / rowscale[:, None]
            bh = b / rowscale
            if len(Em):
                Uu, sv, Vt = np.linalg.svd(Ah, full_matrices=False)
                rank = int(np.sum(sv > 1e-12 * sv[0])) if sv[0] > 0 else 0
            else:
                Uu, sv, Vt, rank = np.zeros((len(expo), 0)), np.zeros(0), np.zeros((0, 0)), 0
            coef = (Uu[:, :rank].T @ bh) / sv[:rank]
            s_star = (Vt[:rank].T @ coef) * colscale             # min-norm sums of the effective monomials
        if rank == len(Em):                                    # every effective sum identified
            self.rscale = np.maximum(colscale, np.abs(s_star))
            self.rmat = None
            self.r0 = s_star / self.rscale
        else:                                                  # only rank combinations identified
            self.rscale = colscale
            self.rmat = Vt[:rank]
            self.r0 = coef
        self.Eeff = Em
        self.unknowns, self.equations = n * len(self.base), rank
        # derivative bookkeeping: d/dx_k of effective monomial j is e_jk · (monomial j − e_k)
        ext = {tuple(r): i for i, r in enumerate(Em)}
        ext_list = [tuple(r) for r in Em]
        q, na = len(self.base), len(Em)
        self.didx = np.zeros((q, na), dtype=np.int64)
        dcoef = np.zeros((q, na))
        for j, k in enumerate(self.base):
            for a in np.flatnonzero(Em[:, k] > 0):
                f = list(Em[a])
                f[k] -= 1
                f = tuple(f)
                if f not in ext:
                    ext[f] = len(ext_list)
                    ext_list.append(f)
                self.didx[j, a] = ext[f]
                dcoef[j, a] = Em[a, k]
        self.ext = np.array(ext_list, dtype=np.int64).reshape(-1, d)
        self.dcoef = dcoef / self.rscale[None, :] if na else dcoef

    # --- coordinates ---
    def internal_rows(self, Xs: np.ndarray) -> np.ndarray:
        """All columns in internal coordinates from the base unknowns Xs (n, q)."""
        V = np.zeros((self.n, self.d))
        V[:, self.bins] = self.U
        V[:, self.base] = Xs
        for w, phi, beta in self.derived:
            V[:, w] = _mono_values(V, phi) @ beta
        return V

    def assemble(self, Xs: np.ndarray) -> np.ndarray:
        """Rows on the original scale."""
        return self.loc + self.sc * self.internal_rows(Xs)

    def errors(self, Xs) -> np.ndarray:
        return relative_errors(self.assemble(Xs), self.expo, self.target, binary=self.binary01)

    def feasible(self, Xs) -> bool:
        return bool(np.all(Xs >= self.lower[None, :] - 1e-12 * (1 + np.abs(self.lower[None, :]))))

    # --- step 2 ---
    def closed_form(self, rng: np.random.Generator) -> np.ndarray:
        n, q = self.n, len(self.base)
        R = rng.standard_normal((n, q))
        R -= self.Qz @ (self.Qz.T @ R)
        U, s, _ = np.linalg.svd(R, full_matrices=False)
        U = U[:, s > 1e-8 * s[0]] if s.size and s[0] > 0 else U[:, :0]
        L = _psd_factor(self.W)
        r = min(U.shape[1], L.shape[1])
        return self.Z @ self.beta + U[:, :r] @ L[:, :r].T

    def reproject(self, Xs: np.ndarray) -> np.ndarray | None:
        """Affine map of the Z-residual of Xs, closest to the identity, that makes the moments of degree ≤ 2
        of the base columns exact: E → E T with Tᵀ(EᵀE)T = W.  None when EᵀE is singular."""
        E = Xs - self.Qz @ (self.Qz.T @ Xs)
        if E.shape[1] == 0:
            return self.Z @ self.beta
        Ge = E.T @ E
        lam = np.linalg.eigvalsh(Ge)
        if lam[0] <= 1e-10 * max(lam[-1], 1e-300):
            return None
        Gh, Gih = _sym_pow(Ge, 0.5), _sym_pow(Ge, -0.5)
        mid = Gh @ self.W @ Gh
        lm, Q = np.linalg.eigh((mid + mid.T) / 2)
        root = (Q * np.sqrt(np.clip(lm, 0.0, None))) @ Q.T
        return self.Z @ self.beta + E @ (Gih @ root @ Gih)

    # --- step 3 ---
    def _eval(self, x: np.ndarray):
        """Scaled residuals at the flat base unknowns x, and the monomial values F (for the Jacobian)."""
        V = np.zeros((self.n, self.d))
        V[:, self.bins] = self.U
        V[:, self.base] = x.reshape(self.n, -1)
        F = _mono_values(V, self.ext)
        s = F[:, :len(self.Eeff)].sum(axis=0) / self.rscale
        return (s if self.rmat is None else self.rmat @ s) - self.r0, F

    def _jac(self, F: np.ndarray) -> np.ndarray:
        """Dense Jacobian (n_eq, n · q) of the scaled residuals."""
        D = F[:, self.didx] * self.dcoef[None]                # (n, q, n_eff)
        J = np.ascontiguousarray(D.transpose(2, 0, 1)).reshape(len(self.Eeff), -1)
        return J if self.rmat is None else self.rmat @ J

    def _bounds_flat(self):
        return np.repeat(self.lower[None, :], self.n, axis=0).ravel()

    def solve_scipy(self, X0: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
        """Step 3 by scipy.optimize.least_squares (trf, exact trust-region solves, bounds for nonneg)."""
        cache = {}

        def ev(x):
            if cache.get("x") is None or not np.array_equal(cache["x"], x):
                cache["x"] = x.copy()
                cache["r"], cache["F"] = self._eval(x)
            return cache

        lb = self._bounds_flat()
        x0 = X0.ravel().copy()
        fin = np.isfinite(lb)
        x0[fin] = np.maximum(x0[fin], lb[fin])
        kw = {}
        if _HAS_CALLBACK:
            def callback(intermediate_result):
                if np.max(np.abs(intermediate_result.fun), initial=0.0) < 1e-3 * tol:
                    raise StopIteration
            kw["callback"] = callback
        res = optimize.least_squares(lambda x: ev(x)["r"], x0, jac=lambda x: self._jac(ev(x)["F"]),
                                     bounds=(lb, np.inf), method="trf", tr_solver="exact", x_scale=1.0,
                                     ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=max_iter, **kw)
        return res.x.reshape(self.n, -1)

    def solve_lm(self, X0: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
        """Step 3 by Levenberg-Marquardt with Nielsen's damping update.

        With more unknowns than equations the step solves (JJᵀ + μI) w = r, δ = −Jᵀw (the minimum-norm
        damped Gauss-Newton step: an n_eq × n_eq Cholesky instead of an SVD of the wide Jacobian), else
        (JᵀJ + μI) δ = −Jᵀr -- the same step.  Bounded (nonneg) entries are parametrised as x = lb + u²."""
        lb = self._bounds_flat()
        bnd = np.isfinite(lb)
        u = X0.ravel().copy()
        u[bnd] = np.sqrt(np.maximum(u[bnd] - lb[bnd], 1e-4))

        def to_x(u):
            x = u.copy()
            x[bnd] = lb[bnd] + u[bnd] ** 2
            return x

        r, F = self._eval(to_x(u))
        f = float(r @ r)
        stop = 1e-3 * tol
        mu, nu = None, 2.0
        hist = []
        for it in range(max_iter):
            if np.max(np.abs(r), initial=0.0) <= stop:
                break
            hist.append(f)
            if it >= 40 and f > 0.5 * hist[-31]:     # stalled (a local minimum): let a restart try
                break
            J = self._jac(F)
            if bnd.any():
                J[:, bnd] *= 2.0 * u[bnd]
            dual = J.shape[1] >= J.shape[0]
            A = J @ J.T if dual else J.T @ J
            g = J.T @ r
            if mu is None:
                mu = 1e-3 * max(float(np.max(np.diag(A), initial=0.0)), 1e-300)
            eye = np.eye(A.shape[0])
            while True:
                try:                         # numpy only here: no second BLAS thread pool (scipy's)
                    L = np.linalg.cholesky(A + mu * eye)
                    z = np.linalg.solve(L.T, np.linalg.solve(L, r if dual else g))
                    delta = -(J.T @ z) if dual else -z
                except np.linalg.LinAlgError:
                    mu, nu = mu * nu, nu * 2.0
                    continue
                r_new, F_new = self._eval(to_x(u + delta))
                f_new = float(r_new @ r_new)
                pred = f - float(np.sum((r + J @ delta) ** 2))
                if np.isfinite(f_new) and f_new < f and pred > 0:
                    rho = (f - f_new) / pred
                    mu *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                    nu = 2.0
                    break
                mu, nu = mu * nu, nu * 2.0
                if mu > 1e30 or not np.isfinite(mu):
                    return to_x(u).reshape(self.n, -1)          # no further progress possible
            small = np.linalg.norm(delta) <= 1e-15 * (np.linalg.norm(u) + 1e-15)
            u, r, F, f = u + delta, r_new, F_new, f_new
            if small:
                break
        return to_x(u).reshape(self.n, -1)


def _generate_group(n, expo, target, binary, nonneg, rng, tol, max_tries, max_iter, solver):
    t0 = time.perf_counter()
    expo = _check_expo(expo)
    d = expo.shape[1]
    target = np.asarray(target, dtype=float)
    if target.shape != (len(expo),) or not np.all(np.isfinite(target)):
        raise ValueError(f"target must be a finite vector of length {len(expo)}")
    if n != int(n) or int(n) < 0:
        raise ValueError("n must be a non-negative integer")
    n = int(n)
    if solver not in ("lm", "scipy"):
        raise ValueError("solver must be 'lm' or 'scipy'")
    declared = [int(k) for k in dict.fromkeys(binary)]
    nonneg = {int(k) for k in nonneg}
    for k in declared + sorted(nonneg):
        if not 0 <= k < d:
            raise ValueError(f"variable index {k} out of range for d = {d}")
    if n == 0:
        V = np.zeros((0, d))
        err = float(np.max(relative_errors(V, expo, target), initial=0.0))
        info = {"n": 0, "max_rel_error": err, "tries": 0, "binary": [], "binary_detected": [],
                "binary_as_real": [], "constant": [], "derived": [], "unknowns": 0, "equations": 0,
                "over_determined": False, "seconds": time.perf_counter() - t0}
        return V, err, info
    g = _Group(n, expo, target, declared, nonneg, rng)
    if g.as_real and any(k in declared for k in g.as_real):
        warnings.warn(f"binary variables {[k for k in g.as_real if k in declared]} are matched as real "
                      f"variables: more than MAX_BINARY = {MAX_BINARY} binaries, or no table of their joint "
                      "counts was found in time", PseudoDataWarning, stacklevel=3)
    K = int(expo.sum(axis=1).max())
    best, best_err, tries = None, np.inf, 0
    for attempt in range(max(1, max_tries)):
        tries = attempt + 1
        X = g.closed_form(rng)
        if g.base and (K > 2 or not g.feasible(X)):
            X = (g.solve_lm if solver == "lm" else g.solve_scipy)(X, tol, max_iter)
            Xr = g.reproject(X)
            if Xr is not None and g.feasible(Xr):
                if g.errors(Xr).max(initial=0.0) <= max(g.errors(X).max(initial=0.0), tol):
                    X = Xr
        err = float(g.errors(X).max(initial=0.0)) if g.feasible(X) else np.inf
        if err < best_err:
            best, best_err = X, err
        if best_err <= tol:
            break
    if best is None:                          # never feasible: clip the last attempt
        best = np.maximum(X, g.lower[None, :])
        best_err = float(g.errors(best).max(initial=0.0))
    V = g.assemble(best)
    V[:, g.binary01] = g.U[:, [g.bins.index(k) for k in g.binary01]]      # exact 0/1, no rounding
    nn = sorted(nonneg)
    V[:, nn] = np.maximum(V[:, nn], 0.0)                                   # rounding-level negatives
    best_err = float(relative_errors(V, expo, target, binary=g.binary01).max(initial=0.0))
    info = {"n": n, "max_rel_error": best_err, "tries": tries, "binary": list(g.bins),
            "binary_detected": list(g.detected), "binary_as_real": list(g.as_real), "constant": list(g.const),
            "derived": [int(w) for w, _, _ in g.derived], "unknowns": g.unknowns, "equations": g.equations,
            "over_determined": g.unknowns < g.equations, "seconds": time.perf_counter() - t0}
    return V, best_err, info


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------

def generate_group(n: int, expo: np.ndarray, target: np.ndarray, *, binary: Sequence[int] = (),
                   nonneg: Sequence[int] = (), rng: np.random.Generator, tol: float = 1e-9,
                   max_tries: int = 6, max_iter: int = 200, solver: str = "lm") -> tuple[np.ndarray, float]:
    """Pseudo rows ``V`` (n, d) with ``moment_sums(V, expo) ≈ target``, and the achieved largest relative error.

    ``expo`` is ``monomials(d, K)`` (or any subset containing every monomial of degree ≤ 2).  Variables in
    ``binary`` are exactly 0/1 with exactly ``round(target[e_k])`` ones (at most :data:`MAX_BINARY`);
    ``nonneg`` variables are ≥ 0.  The error is the largest of :func:`relative_errors`.  Up to
    ``max_tries`` starts are tried until it is ``≤ tol`` and the best is returned; each least-squares
    solve takes at most ``max_iter`` iterations; ``solver="scipy"`` uses
    :func:`scipy.optimize.least_squares` (trf) instead of the built-in Levenberg-Marquardt (slower on
    wide problems, same answers).
    """
    V, err, _ = _generate_group(n, expo, target, binary, nonneg, rng, tol, max_tries, max_iter, solver)
    return V, err


def generate(groups: list[dict], expo, *, binary: Sequence[int] = (), nonneg: Sequence[int] = (),
             seed=0, tol: float = 1e-9, max_tries: int = 6, max_iter: int = 200, solver: str = "lm"
             ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pseudo data for several groups (each a dict with ``"n"`` and ``"target"``).

    Returns ``V`` (Σn, d) with the groups stacked in the order given, the group index (Σn,) (position of
    the group in ``groups``), and diagnostics ``{"max_rel_error": float, "per_group": [dict, ...]}``;
    each per-group dict has ``n``, ``max_rel_error``, ``tries``, ``binary`` (generated 0/1 or two-valued),
    ``binary_detected``, ``binary_as_real``, ``constant``, ``derived``, ``unknowns``, ``equations``,
    ``over_determined`` and ``seconds``.  Each group draws from its own stream spawned from ``seed``
    (:class:`numpy.random.SeedSequence`): the same seed gives the same output, and a group's rows do not
    depend on the other groups.
    """
    expo = _check_expo(expo)
    children = np.random.SeedSequence(seed).spawn(len(groups))
    Vs, gi, per = [], [], []
    for i, (grp, ss) in enumerate(zip(groups, children)):
        V, err, info = _generate_group(grp["n"], expo, grp["target"], binary, nonneg,
                                       np.random.default_rng(ss), tol, max_tries, max_iter, solver)
        Vs.append(V)
        gi.append(np.full(V.shape[0], i, dtype=np.int64))
        per.append(info)
    V = np.vstack(Vs) if Vs else np.zeros((0, expo.shape[1]))
    g = np.concatenate(gi) if gi else np.zeros(0, dtype=np.int64)
    worst = max((p["max_rel_error"] for p in per), default=0.0)
    return V, g, {"max_rel_error": float(worst), "per_group": per}


def generate_order2(n, targets, expo, *, binary_first: bool = False, nonneg_first: bool = False,
                    rng: np.random.Generator, tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo rows for many groups at once when the moments stop at order 2 (the closed form, step 3).

    ``n`` (G,) are the group sizes and ``targets`` (G, M) their moment sums over ``monomials(d, 2)``;
    variable 0 is the outcome: 0/1 with exactly the shared number of ones when ``binary_first``, and
    ≥ 0 when ``nonneg_first``.  Every group is solved by the same linear algebra as
    :func:`generate_group` with ``K = 2`` -- cells (``y = 1``, ``y = 0`` for a binary outcome, else the
    whole group) centred on their known means, and noise with the cells projected out, orthonormalised and
    multiplied by a square root of the pooled within-cell scatter ``W`` -- but batched over groups: one
    normal draw for all rows, per-group Gram matrices by ``reduceat`` and stacked eigen-decompositions.
    Groups this cannot serve exactly (fewer rows than columns plus cells, or a negative outcome where it
    must be ≥ 0) go through :func:`generate_group`.

    Returns ``V`` (Σn, d) with the groups stacked in the order given, the group index of each row and
    the largest relative error of each group (as :func:`relative_errors`)."""
    expo = _check_expo(expo)
    if int(expo.sum(axis=1).max()) != 2:
        raise ValueError("generate_order2 needs the monomials of order 2")
    targets = np.atleast_2d(np.asarray(targets, dtype=float))
    n = np.asarray(np.round(n), dtype=np.int64)
    G, d = len(n), expo.shape[1]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    i1 = np.array([idx[_unit(d, k)] for k in range(d)])
    i2 = np.array([[idx[_unit(d, j, k)] for k in range(d)] for j in range(d)])
    S1, S2 = targets[:, i1], targets[:, i2]
    base = np.arange(1, d) if binary_first else np.arange(d)
    q = len(base)
    if binary_first:
        n1 = np.clip(np.round(S1[:, 0]), 0, n).astype(np.int64)
        nc = np.column_stack([n1, n - n1])                                           # (G, 2) cells
        Sc = np.stack([S2[:, 0, base], S1[:, base] - S2[:, 0, base]], axis=1)        # (G, 2, q)
    else:
        nc = n[:, None]
        Sc = S1[:, None, base]
    C = nc.shape[1]
    means = Sc / np.maximum(nc, 1)[:, :, None]
    W = S2[:, base[:, None], base[None, :]] - np.einsum("gc,gci,gcj->gij", nc, means, means)
    W = (W + np.swapaxes(W, 1, 2)) / 2
    ok = n - (nc > 0).sum(axis=1) >= q + 1
    cell = np.repeat(np.arange(G * C), nc.ravel())                                # row → (group, cell)
    gstart = np.r_[0, np.cumsum(n)[:-1]]                                            # each group's first row
    rowg = cell // C
    N = len(cell)
    V = np.zeros((N, d))
    if binary_first:
        V[:, 0] = (cell % C == 0)
    if q and N:
        R = rng.standard_normal((N, q))
        if nonneg_first and not binary_first:
            # the outcome's column of E is its own noise column, standardised (the factors below are
            # triangular): a gamma draw whose standardised minimum, about −√k, stays above −mean/SD keeps
            # the outcome ≥ 0
            ratio = means[:, 0, 0] / np.sqrt(np.maximum(W[:, 0, 0], 1e-300) / np.maximum(n, 1))
            k = np.clip(0.5 * ratio ** 2, 1e-2, 1e6)
            R[:, 0] = rng.gamma(k[rowg])
        cstart = np.r_[0, np.cumsum(nc.ravel())[:-1]]
        filled = nc.ravel() > 0
        csum = np.zeros((G * C, q))
        csum[filled] = np.add.reduceat(R, cstart[filled], axis=0)
        R -= (csum / np.maximum(nc.ravel(), 1)[:, None])[cell]
        has = n > 0
        gram = np.zeros((G, q, q))
        gram[has] = np.add.reduceat(R[:, :, None] * R[:, None, :], gstart[has], axis=0)
        lg = np.linalg.eigvalsh(gram)
        ok &= lg[:, 0] > 1e-10 * np.maximum(lg[:, -1], 1e-300)
        eye = np.broadcast_to(np.eye(q), (G, q, q))
        LR = np.linalg.cholesky(np.where(ok[:, None, None], gram, eye))
        LW = _psd_cholesky(W)
        # Q = R·L_R⁻ᵀ has QᵀQ = I, and E = Q·L_Wᵀ has EᵀE = W; both factors are triangular
        M = np.linalg.solve(np.swapaxes(LR, 1, 2), np.swapaxes(LW, 1, 2))
        V[:, base] = means.reshape(G * C, q)[cell] + np.einsum("nj,njk->nk", R, M[rowg])
    if nonneg_first and not binary_first and N:
        neg = np.zeros(G, dtype=bool)
        np.logical_or.at(neg, rowg, V[:, 0] < 0)
        ok &= ~neg
    for g in np.flatnonzero(~ok & (n > 0)):                 # the few groups the batch cannot serve exactly
        Vg_, _ = generate_group(int(n[g]), expo, targets[g], binary=[0] if binary_first else [],
                                nonneg=[0] if nonneg_first else [], rng=rng, tol=tol)
        V[gstart[g]:gstart[g] + n[g]] = Vg_
    return V, rowg, _group_errors(V, rowg, n, expo, targets, binary_first)


def _psd_cholesky(W: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L Lᵀ = W for a stack of PSD matrices: columns of (numerically) zero
    variance get a zero column; a matrix that is singular otherwise gets its symmetric square root."""
    G, q, _ = W.shape
    dg = np.einsum("gii->gi", W)
    zero = dg <= 1e-12 * np.maximum(dg.max(axis=1, initial=0.0), 1e-300)[:, None]
    keep = ~zero[:, :, None] & ~zero[:, None, :]
    Wm = np.where(keep, W, 0.0) + np.where(zero[:, :, None] & np.eye(q, dtype=bool), 1.0, 0.0)
    lw = np.linalg.eigvalsh(Wm)
    pd_ = lw[:, 0] > 1e-10 * np.maximum(lw[:, -1], 1e-300)
    L = np.zeros_like(W)
    if pd_.any():
        L[pd_] = np.linalg.cholesky(Wm[pd_]) * ~zero[pd_][:, None, :]
    if (~pd_).any():
        lam, Q = np.linalg.eigh(W[~pd_])
        L[~pd_] = (Q * np.sqrt(np.clip(lam, 0.0, None))[:, None, :]) @ np.swapaxes(Q, 1, 2)
    return L


def _group_errors(V, rowg, n, expo, targets, binary_first) -> np.ndarray:
    """:func:`relative_errors` of every group at once (stacked rows, ``rowg`` their group)."""
    G, d = targets.shape[0], expo.shape[1]
    if len(V) == 0:
        return np.zeros(G)
    has = n > 0
    gstart = np.r_[0, np.cumsum(n)[:-1]]
    got = np.zeros_like(targets)
    got[has] = np.add.reduceat(_mono_values(V, expo), gstart[has], axis=0)
    idx = {tuple(r): m for m, r in enumerate(expo)}
    scale = np.repeat(n[:, None].astype(float), len(expo), axis=1)
    if binary_first:
        ones = np.zeros(G)
        ones[has] = np.add.reduceat(V[:, 0], gstart[has])
        scale[:, expo[:, 0] > 0] = ones[:, None]
    for k in range(1 if binary_first else 0, d):
        rms = np.sqrt(np.maximum(targets[:, idx[_unit(d, k, k)]], 0.0) / np.maximum(n, 1))
        scale *= rms[:, None] ** expo[None, :, k]
    scale = np.maximum(np.maximum(np.abs(targets), scale), 1e-300)
    return np.max(np.abs(got - targets) / scale, axis=1, initial=0.0)
