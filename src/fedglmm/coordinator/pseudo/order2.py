"""Order-2 pseudo data for many groups at once: the degree-≤2 closed form of the per-group generator,
batched over groups (:func:`generate_order2`)."""
from __future__ import annotations

import numpy as np

from ...model.moments import mono_values, unit
from .solver import generate_group
from .structure import _check_expo

__all__ = ["generate_order2"]


def generate_order2(n, targets, expo, *, binary_first: bool = False, nonneg_first: bool = False,
                    rng, tol: float = 1e-9, exact: bool = True, sites=None,
                    levels=()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    With ``exact`` False (a start, not a fit: the hybrid's), a group whose draw has a negative outcome
    where it must be ≥ 0 is drawn again, batched with the others, up to ``REDRAWS`` times, and then has its
    outcome clipped at 0 (its moments then off by what was clipped) rather than solved group by group.

    Returns ``V`` (Σn, d) with the groups stacked in the order given, the group index of each row and
    the largest relative error of each group (as :func:`fedglmm.model.moments.relative_errors`; NaN, not
    computed, when ``exact`` is False).

    Several sites' groups at once: ``rng`` a list of generators, one per site, and ``sites`` (G,) the
    site of each group, non-decreasing.  Each site's draws come from its own generator in the order a call
    for that site alone would make them, so its rows are those of that call (bit for bit): the batch only
    saves the coordinator the per-call overhead, which with 100 sites of 10 groups was most of the work.

    ``levels``: the variables that code one factor in treatment contrasts (0/1, at most one 1 per row; the
    caller knows them by name): its levels are then cells too (:func:`_cells`), so the rows hold the factor
    exactly.  Ignored unless there are two or more and the sums bear them out."""
    n = np.asarray(np.round(n), dtype=np.int64)
    if sites is None:
        rng, sites = [rng], np.zeros(len(n), dtype=np.int64)
    return _order2(n, targets, expo, binary_first, nonneg_first, list(rng), tol, 0 if exact else REDRAWS,
                   np.asarray(sites, dtype=np.int64), list(levels))


REDRAWS = 4


def _order2(n, targets, expo, binary_first, nonneg_first, rngs: list, tol, redraws: int, sites: np.ndarray,
            levels: list):
    """:func:`generate_order2` (``rngs`` one generator per site, ``sites`` the site of each group);
    ``redraws`` > 0: a start, whose negative outcomes are drawn again (and at the last, clipped) rather than
    solved group by group."""
    expo = _check_expo(expo)
    if int(expo.sum(axis=1).max()) != 2:
        raise ValueError("generate_order2 needs the monomials of order 2")
    targets = np.atleast_2d(np.asarray(targets, dtype=float))
    n = np.asarray(np.round(n), dtype=np.int64)
    G, d = len(n), expo.shape[1]
    base, nc, means, W, block = _cells(n, targets, expo, binary_first, levels)
    q, C = len(base), nc.shape[1]
    ok = n - (nc > 0).sum(axis=1) >= q + 1
    cell = np.repeat(np.arange(G * C), nc.ravel())                                # row → (group, cell)
    gstart = np.r_[0, np.cumsum(n)[:-1]]                                            # each group's first row
    rowg = cell // C
    N = len(cell)
    V = np.zeros((N, d))
    nlev = len(block) + 1                         # (cells: see _cells)
    if binary_first:
        V[:, 0] = (cell % C) < nlev
    for j, col in enumerate(block):               # one factor's 0/1 columns: the cells are its levels
        V[:, col] = (cell % C) % nlev == j + 1
    if q and N:
        k = _gamma_shape(n, nc, means, W) if nonneg_first and not binary_first else None
        R = _noise(rngs, sites[rowg], rowg, q, k)
        cstart = np.r_[0, np.cumsum(nc.ravel())[:-1]]
        filled = nc.ravel() > 0
        csum = np.zeros((G * C, q))
        csum[filled] = np.add.reduceat(R, cstart[filled], axis=0)
        if nonneg_first and C > 1:
            R[:, 0] = _level_scaled(R[:, 0], csum[:, 0], nc, means, cell, rowg)
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
        if redraws and np.any(neg & ok):
            again = np.flatnonzero(neg & ok)
            # the rows of those groups, in order (each group's first row plus 0 .. n − 1)
            rows = np.repeat(gstart[again] - np.r_[0, np.cumsum(n[again])[:-1]], n[again]) + np.arange(n[again].sum())
            if redraws > 1:
                V[rows] = _order2(n[again], targets[again], expo, binary_first, nonneg_first, rngs, tol, redraws - 1,
                                  sites[again], levels)[0]
            else:
                V[rows, 0] = np.maximum(V[rows, 0], 0.0)
            neg[again] = False
        ok &= ~neg
    for g in np.flatnonzero(~ok & (n > 0)):                 # the few groups the batch cannot serve exactly
        Vg_, _ = generate_group(int(n[g]), expo, targets[g], binary=([0] if binary_first else []) + block,
                                nonneg=[0] if nonneg_first else [], rng=rngs[sites[g]], tol=tol)
        V[gstart[g]:gstart[g] + n[g]] = Vg_
    # the moment errors are the one-shot fit's diagnostics; a start's draw (redraws) does not need them
    errors = _group_errors(V, rowg, n, expo, targets, binary_first) if not redraws else np.full(len(n), np.nan)
    return V, rowg, errors


def _gamma_shape(n, nc, means, W) -> np.ndarray:
    """The shape k (per group) of the outcome's gamma noise.  The outcome's column of E is its own noise
    column, standardised (the factors below are triangular): a gamma draw whose standardised minimum, about
    −√k, stays above −mean/SD keeps the outcome ≥ 0.  With a factor's levels as cells (see
    :func:`_level_scaled`) k is set so that the scale W asks of m·(g/ḡ − 1) is about a half."""
    if nc.shape[1] == 1:
        ratio = means[:, 0, 0] / np.sqrt(np.maximum(W[:, 0, 0], 1e-300) / np.maximum(n, 1))
        return np.clip(0.5 * ratio ** 2, 1e-2, 1e6)
    return np.clip(0.25 * np.einsum("gc,gc->g", np.maximum(nc - 1, 0), means[:, :, 0] ** 2)
                   / np.maximum(W[:, 0, 0], 1e-300), 1e-2, 1e6)


def _level_scaled(g: np.ndarray, gsum: np.ndarray, nc, means, cell, rowg) -> np.ndarray:
    """The outcome's noise with a factor's levels as cells: m·(g/ḡ − 1), with g the rows' gamma draws, ḡ
    their level's mean (``gsum`` the levels' sums) and m the level's mean outcome (0 where the outcome sums
    to 0 there: it is then 0 in every row).  The outcome m + a·m·(g/ḡ − 1) is ≥ 0 while the scale a that W
    sets is ≤ 1, whatever the level's size.  A group whose outcome is all 0 keeps its draw as it is."""
    G, C = nc.shape
    mc = np.maximum(means[:, :, 0].ravel(), 0.0)[cell]
    gbar = (gsum / np.maximum(nc.ravel(), 1))[cell]
    some = np.zeros(G, dtype=bool)
    np.logical_or.at(some, rowg, mc > 0)
    return np.where(some[rowg], mc * (g / np.maximum(gbar, 1e-300) - 1.0), g)


def _noise(rngs: list, rowsite: np.ndarray, rowg: np.ndarray, q: int, k) -> np.ndarray:
    """The standard normal noise (N, q) of the rows, each site's block from its own generator, and with
    ``k`` (per group) the outcome's column a gamma(k) draw after them (rows sorted by site)."""
    bounds = np.searchsorted(rowsite, np.arange(len(rngs) + 1))
    R = np.empty((len(rowg), q))
    for gen, a, b in zip(rngs, bounds[:-1], bounds[1:]):
        if b > a:
            R[a:b] = gen.standard_normal((b - a, q))
            if k is not None:
                R[a:b, 0] = gen.gamma(k[rowg[a:b]])
    return R


def _cells(n, targets, expo, binary_first, levels=()):
    """Per group, its cells: the levels of one factor's 0/1 columns ``levels`` where the sums bear them out
    (:func:`_factor_block`; else the whole group), each split by ``y = 1``, ``y = 0`` when
    ``binary_first`` (cell c: y = 1 for c < L + 1, level c mod (L + 1), level 0 the reference).  Returns the
    base columns, the cell sizes ``nc`` (G, C), the cells' means of the base columns (G, C, q), the pooled
    within-cell scatter ``W`` (G, q, q), read off the order-2 targets, and the factor's columns.

    A 0/1 outcome beside a factor: the cells' sizes are known (Σy·dⱼ), their means of a base column x are
    not (Σx·y·dⱼ is of order 3); they are taken additive, a_j + b·y, the least-squares fit to the level
    sums Σx·dⱼ and Σx·y (its normal equations): every order-2 moment is then matched, and W (the scatter
    about those means) is positive semi-definite as the data's is."""
    d = expo.shape[1]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    i1 = np.array([idx[unit(d, k)] for k in range(d)])
    i2 = np.array([[idx[unit(d, j, k)] for k in range(d)] for j in range(d)])
    S1, S2 = targets[:, i1], targets[:, i2]
    block = _factor_block(n, S1, S2, levels)
    B = np.asarray(block, dtype=np.int64)
    base = np.array([k for k in range(d) if k not in block and not (binary_first and k == 0)], dtype=np.int64)
    # level sizes (G, L + 1), apportioned to the group's rows (a compressed group's sums are not whole)
    N = _apportion(np.column_stack([targets[:, idx[(0,) * d]] - S1[:, B].sum(axis=1), S1[:, B]]), n)
    Nj = N[:, 1:]
    Sx = S2[:, B][:, :, base]
    Sx = np.concatenate([(S1[:, base] - Sx.sum(axis=1))[:, None], Sx], axis=1)      # level sums (G, L + 1, q)
    n1 = np.clip(np.round(S1[:, 0]), 0, n).astype(np.int64)                          # (a 0/1 outcome's ones)
    if binary_first and not block:
        nc = np.column_stack([n1, n - n1])                                           # (G, 2) cells
        means = np.stack([S2[:, 0, base], S1[:, base] - S2[:, 0, base]], axis=1) / np.maximum(nc, 1)[:, :, None]
    elif binary_first:
        N1 = np.minimum(_apportion(np.column_stack([S1[:, 0] - S2[:, 0, B].sum(axis=1), S2[:, 0, B]]), n1), N)
        nc = np.concatenate([N1, N - N1], axis=1)                                   # (G, 2(L + 1)) cells
        Nm = np.maximum(N, 1)[:, :, None]
        D = np.sum(N1 * (N - N1) / np.maximum(N, 1), axis=1)                          # Σ n₁ⱼ n₀ⱼ / nⱼ
        num = S2[:, 0, base] - np.sum(N1[:, :, None] * Sx / Nm, axis=1)
        b = np.where((D > 1e-9 * np.maximum(n, 1))[:, None], num / np.where(D > 0, D, 1.0)[:, None], 0.0)
        a = (Sx - N1[:, :, None] * b[:, None, :]) / Nm
        means = np.concatenate([a + b[:, None, :], a], axis=1)                       # (G, C, q)
    else:
        nc = N
        means = Sx / np.maximum(nc, 1)[:, :, None]
    W = S2[:, base[:, None], base[None, :]] - np.einsum("gc,gci,gcj->gij", nc, means, means)
    return base, nc, means, (W + np.swapaxes(W, 1, 2)) / 2, [int(k) for k in block]


def level_scatter(n, targets, expo, levels) -> tuple[np.ndarray, np.ndarray]:
    """Each variable's scatter within the levels of the factor whose 0/1 columns are ``levels`` (where the
    sums bear them out; else within the group), by group, from the order-2 sums ``targets`` (G, M) over
    ``expo`` -- the diagonal of :func:`_cells`' ``W`` (0 for the factor's own columns); and beside it Σx²,
    the scale it is 0 against (both (G, d))."""
    targets = np.atleast_2d(np.asarray(targets, float))
    base, _, _, W, _ = _cells(np.asarray(np.round(n), dtype=np.int64), targets, expo, False, levels)
    d = expo.shape[1]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    ss = np.zeros((len(targets), d))
    ss[:, base] = np.einsum("gkk->gk", W)
    return ss, targets[:, [idx[unit(d, k, k)] for k in range(d)]]


def _factor_block(n, S1, S2, levels) -> list:
    """``levels`` (columns, but the outcome 0) if the order-2 sums of every group bear them out as one
    factor's treatment coding -- each 0/1 (Σx² = Σx: with x in {0, 1} only), no two 1 in the same row
    (Σxⱼxₖ = 0), at most n ones in all -- and there are two or more (a factor of three levels or more);
    else none.  Their rows are then fixed as the cells, level by level, and the other columns drawn around
    each level's means: the pseudo rows hold that factor exactly, as a count's or a 0/1 outcome's
    likelihood needs (exp(η) of a level is not that of a real column with the level's mean and variance).
    A single 0/1 column (a two-level factor) is drawn as a real one, as before: on the 200 poisson fits of
    `benchmarks/stress_methods.py --seed 1..4` (a 0/1 covariate beside two real ones) its levels as cells
    moved the rounds both ways, 658 -> 660 in all, one fit 6 -> 7."""
    cols = [int(k) for k in levels if 0 < int(k) < S1.shape[1]]
    if len(cols) < 2:
        return []
    tol = 1e-9 * np.maximum(1.0, np.abs(S1[:, cols]))
    zero_one = np.all(np.abs(np.einsum("gkk->gk", S2)[:, cols] - S1[:, cols]) <= tol) and np.all(S1[:, cols] >= -tol)
    apart = all(np.all(np.abs(S2[:, j, k]) <= 1e-9 * np.maximum(1.0, n)) for j in cols for k in cols if j < k)
    inside = np.all(S1[:, cols].sum(axis=1) <= n + 1e-9 * np.maximum(1.0, n))
    return cols if zero_one and apart and inside else []


def _apportion(parts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Whole numbers (G, K) ≥ 0 summing to ``total`` (G,) by row, each within one of ``parts`` (G, K) where
    those sum to the total (largest remainders; the sums of a group of compressed rows are not whole)."""
    parts = np.maximum(parts, 0.0)
    out = np.floor(parts + 1e-9).astype(np.int64)
    short = np.asarray(total, dtype=np.int64) - out.sum(axis=1)
    rank = np.argsort(np.argsort(-(parts - out), axis=1, kind="stable"), axis=1, kind="stable")
    out += rank < short[:, None]
    over = np.maximum(-short, 0)                  # (parts above the total: the largest lose one each)
    if np.any(over):
        big = np.argsort(np.argsort(-out, axis=1, kind="stable"), axis=1, kind="stable")
        out -= (big < over[:, None]) & (out > 0)
    return out


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
    """:func:`fedglmm.model.moments.relative_errors` of every group at once (stacked rows, ``rowg`` their group)."""
    G, d = targets.shape[0], expo.shape[1]
    if len(V) == 0:
        return np.zeros(G)
    has = n > 0
    gstart = np.r_[0, np.cumsum(n)[:-1]]
    got = np.zeros_like(targets)
    got[has] = np.add.reduceat(mono_values(V, expo), gstart[has], axis=0)
    idx = {tuple(r): m for m, r in enumerate(expo)}
    scale = np.repeat(n[:, None].astype(float), len(expo), axis=1)
    if binary_first:
        ones = np.zeros(G)
        ones[has] = np.add.reduceat(V[:, 0], gstart[has])
        scale[:, expo[:, 0] > 0] = ones[:, None]
    for k in range(1 if binary_first else 0, d):
        rms = np.sqrt(np.maximum(targets[:, idx[unit(d, k, k)]], 0.0) / np.maximum(n, 1))
        scale *= rms[:, None] ** expo[None, :, k]
    scale = np.maximum(np.maximum(np.abs(targets), scale), 1e-300)
    return np.max(np.abs(got - targets) / scale, axis=1, initial=0.0)
