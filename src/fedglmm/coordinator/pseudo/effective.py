"""The moment equations of one group in its *effective* monomials (products of base and binary variables
after derived columns are expanded): the identified sums they must reach and the Jacobian's index tables."""
from __future__ import annotations

import numpy as np

from ...model.moments import binary_masks, mono_values, support_counts, unit


def poly_mul(p: dict, q: dict, cap: np.ndarray) -> dict:
    """Product of two polynomials {exponent tuple: coefficient}; binary exponents capped at 1 (b² = b)."""
    out: dict = {}
    for e1, c1 in p.items():
        for e2, c2 in q.items():
            e = tuple(min(a + b, 1) if cp else a + b for a, b, cp in zip(e1, e2, cap))
            out[e] = out.get(e, 0.0) + c1 * c2
    return out


def expand(expo: np.ndarray, bins: list[int], base: list[int], const: list[int], derived: list) -> list[dict]:
    """Every monomial of ``expo`` as a polynomial ``{exponent tuple: coefficient}`` of the base and binary
    variables: constant columns are 0, derived columns (``[(w, φ exponents, β)]`` in evaluation order) their
    polynomial of the others, ``b² = b`` for binaries; coefficients below 1e-14 × the largest are dropped."""
    d = expo.shape[1]
    cap = np.zeros(d, dtype=bool)
    cap[bins] = True
    zero = tuple([0] * d)
    poly = {k: {unit(d, k): 1.0} for k in bins + base}
    for k in const:
        poly[k] = {}
    for w, phi, beta in derived:
        pw: dict = {}
        for f, b in zip(phi, beta):
            term = {zero: float(b)}
            for c in np.flatnonzero(f):
                for _ in range(int(f[c])):
                    term = poly_mul(term, poly[c], cap)
            for e, v in term.items():
                pw[e] = pw.get(e, 0.0) + v
        poly[w] = pw
    powers: dict = {}

    def power(c, k):
        if (c, k) not in powers:
            powers[(c, k)] = poly[c] if k == 1 else poly_mul(power(c, k - 1), poly[c], cap)
        return powers[(c, k)]

    rows = []
    for e in expo:
        p = {zero: 1.0}
        for c in np.flatnonzero(e):
            p = poly_mul(p, power(c, int(e[c])), cap)
        big = max((abs(v) for v in p.values()), default=0.0)
        rows.append({k: v for k, v in p.items() if abs(v) > 1e-14 * big})
    return rows


def effective_sums(n: int, rows: list[dict], expo: np.ndarray, ts: np.ndarray, U: np.ndarray, bins: list[int],
                   base: list[int]):
    """The targets ``ts`` as a linear system ``A s = t'`` in the sums ``s`` of the distinct effective
    monomials that involve a base variable (the others are fixed by the binary block ``U``), solved once.

    Returns ``(Em, rscale, rmat, r0, rank)``: those monomials, the scale of each sum, and the scaled
    residual's parts -- ``(rmat @ (s / rscale)) − r0`` with ``rmat`` None when every sum is identified
    (then ``r0 = s* / rscale``), else the identified combinations (right singular vectors)."""
    d = expo.shape[1]
    keys = sorted(set().union(*rows), key=lambda e: (sum(e), tuple(-x for x in e)))
    E = np.array(keys, dtype=np.int64).reshape(len(keys), d)
    col = {k: j for j, k in enumerate(keys)}
    er = np.array([m for m, p in enumerate(rows) for _ in p], dtype=np.int64)       # sparse A: rows,
    ec = np.array([col[k] for p in rows for k in p], dtype=np.int64)               # columns,
    ev = np.array([v for p in rows for v in p.values()], dtype=float)              # values
    Ns_eff = support_counts(U, binary_masks(E, bins))
    moving = (E[:, base] > 0).any(axis=1) & (Ns_eff > 0) if base else np.zeros(len(E), bool)
    Vfix = np.zeros((n, d))
    Vfix[:, bins] = U
    S_all = np.zeros(len(E))
    S_all[~moving] = mono_values(Vfix, E[~moving]).sum(axis=0)
    fixed_e = ~moving[ec]
    b = ts - np.bincount(er[fixed_e], weights=ev[fixed_e] * S_all[ec[fixed_e]], minlength=len(expo))
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
        rowscale = np.maximum(np.abs(ts), support_counts(U, binary_masks(expo, bins)))
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
        rscale = np.maximum(colscale, np.abs(s_star))
        rmat = None
        r0 = s_star / rscale
    else:                                                  # only rank combinations identified
        rscale = colscale
        rmat = Vt[:rank]
        r0 = coef
    return Em, rscale, rmat, r0, rank


def derivative_tables(Em: np.ndarray, base: list[int], rscale: np.ndarray):
    """d/dx_k of effective monomial j is e_jk · (monomial j − e_k): ``(didx, ext, dcoef)`` with ``ext`` the
    effective monomials followed by the lowered ones, ``didx[k, j]`` the row of ext for (j − e_k) and
    ``dcoef[k, j] = e_jk / rscale_j``."""
    d = Em.shape[1]
    ext = {tuple(r): i for i, r in enumerate(Em)}
    ext_list = [tuple(r) for r in Em]
    q, na = len(base), len(Em)
    didx = np.zeros((q, na), dtype=np.int64)
    dcoef = np.zeros((q, na))
    for j, k in enumerate(base):
        for a in np.flatnonzero(Em[:, k] > 0):
            f = list(Em[a])
            f[k] -= 1
            f = tuple(f)
            if f not in ext:
                ext[f] = len(ext_list)
                ext_list.append(f)
            didx[j, a] = ext[f]
            dcoef[j, a] = Em[a, k]
    ext_arr = np.array(ext_list, dtype=np.int64).reshape(-1, d)
    dcoef = dcoef / rscale[None, :] if na else dcoef
    return didx, ext_arr, dcoef
