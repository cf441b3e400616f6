"""The sparse Cholesky factor of H = ΛᵀZᵀWZΛ + I over one site's random effects, by factor blocks.

With several grouping factors a site's random effects u (one q_f-vector per level of each factor f)
form one sparse problem: row j touches one level of every factor, so H has a q_f×q_f block per level
on its diagonal and a q_f×q_g block for every pair of levels that share a row.  The factor is built
by block elimination, vectorised over the levels of a factor (no loop over groups):

* **elimination order**: factors by decreasing number of levels.  The longest prefix f_0 ⊂ f_1 ⊂ … in
  which each factor is nested in the next (every level of f_k lies in one level of f_{k+1}) is the
  *chain*: its diagonal blocks stay block-diagonal when the factors before are eliminated, and its
  off-diagonal blocks stay those of a tree (a level and its ancestors), so a nested design -- visits in
  patients in wards -- factors with no fill at all, in time linear in the number of levels;
* the other factors form the *tail* (crossed factors: sample × plate, rater × item): the Schur
  complement over them is in general dense (every two levels that meet a common level of the chain
  couple), and is kept and factored dense.  Its size is Σ G_f q_f over the tail only -- the factors
  with fewer levels -- never the whole site's random effects.  (A level shared with other sites would
  be a tail block too: a site could send the Schur complement over it instead of factoring it.)

With L the factor, ``logdet`` = log det H, ``solve`` applies H⁻¹, and ``selected_inverse`` gives the
entries of Σ = H⁻¹ on the pattern of H (diagonal blocks, and the blocks of every pair of levels that
share a row) by the block Takahashi recursions (Takahashi, Fagan & Chin 1973; Erisman & Tinney 1975):
for a block column i with the off-diagonal blocks L_ji of its structure S(i) and Ũ_ji = L_ji L_ii⁻¹,

    Σ_ri = −Σ_{j∈S(i)} Σ_rj Ũ_ji  (r ∈ S(i)),      Σ_ii = (L_ii L_iiᵀ)⁻¹ − Σ_{j∈S(i)} Ũ_jiᵀ Σ_ji,

taken from the tail (dense inverse) down the chain.  These entries are what the gradient of a Laplace
log-determinant needs (:mod:`fedglmm.likelihood.multilevel`).

Blocks are passed as per-factor arrays in the design's factor order: ``u[f]`` of shape (G_f, q_f, …).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..model.spec import theta_index
from .linalg import chol, inv

TAIL_LIMIT = 20000          # random effects in the dense tail (crossed factors) a site will factor


def aggregator(index: np.ndarray, size: int) -> sp.csr_matrix:
    """A (size × len(index)) 0/1 matrix whose product with V sums the rows of V by ``index``."""
    n = len(index)
    return sp.csr_matrix((np.ones(n), (np.asarray(index), np.arange(n))), shape=(size, n))


def _unique_pairs(a: np.ndarray, b: np.ndarray, nb: int):
    """Distinct (a, b) pairs sorted by a then b, and each row's pair index."""
    key, inverse = np.unique(a.astype(np.int64) * nb + b, return_inverse=True)
    return key // nb, key % nb, inverse.ravel()


def _parent(a: np.ndarray, b: np.ndarray, na: int, nb: int):
    """parent[level of a] = the one level of b it lies in; None if some level of a meets several."""
    la, lb, _ = _unique_pairs(a, b, nb)
    if len(la) != na:
        return None
    par = np.empty(na, dtype=np.int64)
    par[la] = lb
    return par


class Pattern:
    """The structure of H at one site (built once per design): elimination order, chain and tail,
    the pairs of levels that share rows, and the index maps that put row sums into blocks."""

    def __init__(self, codes: list, nlevels: list, q: list):
        self.codes = [np.asarray(c, dtype=np.int64) for c in codes]
        self.G, self.q = [int(g) for g in nlevels], [int(k) for k in q]
        self.n = len(self.codes[0])
        order = sorted(range(len(codes)), key=lambda f: (-self.G[f], f))
        self.chain, parents = [order[0]], []
        for f in order[1:]:
            par = _parent(self.codes[self.chain[-1]], self.codes[f], self.G[self.chain[-1]], self.G[f])
            if par is None:
                break
            self.chain.append(f)
            parents.append(par)
        self.tail = [f for f in order if f not in self.chain]
        m = len(self.chain)
        # par[k][g]: level of chain factor g (> k) above each level of chain factor k
        self.par = [{k + 1: parents[k]} if k < m - 1 else {} for k in range(m)]
        for k in range(m - 3, -1, -1):
            for g in range(k + 2, m):
                self.par[k][g] = self.par[k + 1][g][parents[k]]
        self.row_agg = [aggregator(self.codes[f], self.G[f]) for f in self.chain]
        self.up_agg = [{g: aggregator(p, self.G[self.chain[g]]) for g, p in self.par[k].items()} for k in range(m)]
        self._tail_pattern()

    @property
    def nested(self) -> bool:
        return not self.tail

    def _tail_pattern(self):
        """Offsets of the tail factors in the dense tail, the chain–tail and tail–tail pairs."""
        self.off, R = {}, 0
        for t in self.tail:
            self.off[t] = R
            R += self.G[t] * self.q[t]
        self.R = R
        if R > TAIL_LIMIT:
            names = ", ".join(str(t) for t in self.tail)
            raise ValueError(f"crossed grouping factors ({names}) with {R} random effects beyond the nested "
                             f"ones: more than {TAIL_LIMIT}")
        self.kt = {}                      # (k, t) -> (levels of chain k, levels of t, row's pair, aggregator)
        for k, f in enumerate(self.chain):
            for t in self.tail:
                lk, lt, row = _unique_pairs(self.codes[f], self.codes[t], self.G[t])
                self.kt[k, t] = (lk, lt, row, aggregator(row, len(lk)))
        # lift[(k, g, t)]: the pair (parent in g, level of t) of each (k, t) pair
        self.lift = {}
        for (k, t), (lk, lt, _, _) in self.kt.items():
            for g, par in self.par[k].items():
                glk, glt, _, _ = self.kt[g, t]
                key = glk * self.G[t] + glt
                idx = np.searchsorted(key, par[lk] * self.G[t] + lt)
                self.lift[k, g, t] = (idx, aggregator(idx, len(glk)))
        self.tt = {}                      # (t, s), t before s in the tail: pairs and aggregator
        for i, t in enumerate(self.tail):
            for s in self.tail[i + 1:]:
                lt, ls, row = _unique_pairs(self.codes[t], self.codes[s], self.G[s])
                self.tt[t, s] = (lt, ls, aggregator(row, len(lt)))
        self.tail_agg = {t: aggregator(self.codes[t], self.G[t]) for t in self.tail}

    def tail_index(self, t: int, levels: np.ndarray) -> np.ndarray:
        """Positions in the dense tail of the q_t entries of each level: (len(levels), q_t)."""
        return self.off[t] + np.asarray(levels)[:, None] * self.q[t] + np.arange(self.q[t])

    def coupling(self, k: int, blocks: dict) -> sp.csr_matrix:
        """The (R × G_k q_k) sparse matrix of chain factor k's blocks with the tail (``blocks[t]`` of
        shape (pairs, q_t, q_k))."""
        f = self.chain[k]
        qk = self.q[f]
        rows, cols, vals = [], [], []
        for t in self.tail:
            lk, lt, _, _ = self.kt[k, t]
            r = self.tail_index(t, lt)[:, :, None]
            c = (lk[:, None] * qk + np.arange(qk))[:, None, :]
            rr, cc = np.broadcast_arrays(r, c)
            rows.append(rr.ravel())
            cols.append(cc.ravel())
            vals.append(np.asarray(blocks[t]).ravel())
        if not rows:
            return sp.csr_matrix((self.R, self.G[f] * qk))
        return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(self.R, self.G[f] * qk))

    # --- H from rows ----------------------------------------------------------------------------
    def assemble(self, w: np.ndarray, M: list) -> dict:
        """The blocks of Σ_j w_j m_j m_jᵀ + I (``M[f]``: (n, q_f) rows of ZΛ of factor f)."""
        def rowsum(agg, a, b):
            out = agg @ (w[:, None] * (a[:, :, None] * b[:, None, :]).reshape(len(w), -1))
            return out.reshape(-1, a.shape[1], b.shape[1])

        D, B, V = [], {}, {}
        for k, f in enumerate(self.chain):
            agg = self.row_agg[k]
            D.append(rowsum(agg, M[f], M[f]) + np.eye(self.q[f]))
            for g in self.par[k]:
                B[g, k] = rowsum(agg, M[self.chain[g]], M[f])                   # (G_k, q_g, q_k)
            for t in self.tail:
                V[k, t] = rowsum(self.kt[k, t][3], M[t], M[f])                  # (pairs, q_t, q_k)
        T = np.eye(self.R) if self.R else np.zeros((0, 0))
        for t in self.tail:
            idx = self.tail_index(t, np.arange(self.G[t]))
            T[idx[:, :, None], idx[:, None, :]] += rowsum(self.tail_agg[t], M[t], M[t])
        for (t, s), (lt, ls, agg) in self.tt.items():
            blk = rowsum(agg, M[t], M[s])
            it, js = self.tail_index(t, lt), self.tail_index(s, ls)
            T[it[:, :, None], js[:, None, :]] += blk
            T[js[:, :, None], it[:, None, :]] += blk.transpose(0, 2, 1)
        return {"D": D, "B": B, "V": V, "T": T}

    def factor(self, blocks: dict) -> "Factor":
        return Factor(self, blocks)


class Factor:
    """H = L Lᵀ by block elimination along the chain, then the dense tail (see the module docstring)."""

    def __init__(self, pat: Pattern, blocks: dict):
        self.pat = pat
        m = len(pat.chain)
        D = [d.copy() for d in blocks["D"]]
        B = {key: b.copy() for key, b in blocks["B"].items()}
        V = {key: v.copy() for key, v in blocks["V"].items()}
        T = blocks["T"].copy()
        self.L, self.Linv, self.U, self.W = [], [], {}, []
        for k in range(m):
            L = chol(D[k])
            Li = inv(L)
            self.L.append(L)
            self.Linv.append(Li)
            LiT = Li.transpose(0, 2, 1)
            for g in pat.par[k]:
                self.U[g, k] = B[g, k] @ LiT                                        # L_gk (G_k, q_g, q_k)
            UT = {t: V[k, t] @ LiT[pat.kt[k, t][0]] for t in pat.tail}            # L_tk per pair
            self.U.update({(k, t): u for t, u in UT.items()})
            self._schur(k, D, B, V, UT)
            W = pat.coupling(k, UT) if pat.R else None
            self.W.append(W)
            if pat.R:
                T -= (W @ W.T).toarray()
        self.LT = np.linalg.cholesky(T) if pat.R else np.zeros((0, 0))
        self.logdet = 2.0 * sum(float(np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)))) for L in self.L) \
            + 2.0 * float(np.sum(np.log(np.diag(self.LT))))

    def _schur(self, k, D, B, V, UT):
        """Subtract chain level k's contribution from the blocks of the factors after it."""
        pat = self.pat
        for g, agg in pat.up_agg[k].items():
            Ug = self.U[g, k]
            D[g] -= _rows(agg, Ug @ Ug.transpose(0, 2, 1))
            for h in pat.par[k]:
                if h > g:
                    B[h, g] -= _rows(agg, self.U[h, k] @ Ug.transpose(0, 2, 1))
            for t in pat.tail:
                idx, lagg = pat.lift[k, g, t]
                V[g, t] -= _rows(lagg, UT[t] @ Ug[pat.kt[k, t][0]].transpose(0, 2, 1))

    # --- solves ---------------------------------------------------------------------------------
    def solve(self, b: list) -> list:
        """H⁻¹ b for per-factor right-hand sides ``b[f]`` of shape (G_f, q_f) or (G_f, q_f, r)."""
        pat = self.pat
        vec = b[0].ndim == 2
        y = [np.array(x, float)[..., None] if vec else np.array(x, float) for x in b]
        r = y[0].shape[2]
        yT = np.zeros((pat.R, r))
        for t in pat.tail:
            yT[pat.tail_index(t, np.arange(pat.G[t])).ravel()] = y[t].reshape(-1, r)
        for k, f in enumerate(pat.chain):
            y[f] = self.Linv[k] @ y[f]
            for g, agg in pat.up_agg[k].items():
                y[pat.chain[g]] -= _rows(agg, self.U[g, k] @ y[f])
            if pat.R:
                yT -= self.W[k] @ y[f].reshape(-1, r)
        if pat.R:
            yT = _cho_solve((self.LT, True), yT)
        for k in range(len(pat.chain) - 1, -1, -1):
            f = pat.chain[k]
            for g in pat.par[k]:
                y[f] -= self.U[g, k].transpose(0, 2, 1) @ y[pat.chain[g]][pat.par[k][g]]
            if pat.R:
                y[f] -= (self.W[k].T @ yT).reshape(y[f].shape)
            y[f] = self.Linv[k].transpose(0, 2, 1) @ y[f]
        for t in pat.tail:
            y[t] = yT[pat.tail_index(t, np.arange(pat.G[t])).ravel()].reshape(pat.G[t], pat.q[t], r)
        return [x[..., 0] for x in y] if vec else y

    # --- selected inverse -----------------------------------------------------------------------
    def selected_inverse(self) -> "Selected":
        """Σ = H⁻¹ on the pattern of H (see the module docstring)."""
        pat = self.pat
        m = len(pat.chain)
        ST = _cho_solve((self.LT, True), np.eye(pat.R)) if pat.R else np.zeros((0, 0))
        SD, SB, SV = [None] * m, {}, {}
        for k in range(m - 1, -1, -1):
            f, Li = pat.chain[k], self.Linv[k]
            Ut = {g: self.U[g, k] @ Li for g in pat.par[k]}                       # Ũ_gk (G_k, q_g, q_k)
            UtT = {t: self.U[k, t] @ Li[pat.kt[k, t][0]] for t in pat.tail}        # Ũ_tk per pair
            for g in pat.par[k]:                                                   # Σ(ancestor g, k)
                acc = 0.0
                for h in pat.par[k]:
                    acc = acc + self._anc(SD, SB, k, g, h) @ Ut[h]
                for t in pat.tail:
                    lift = pat.lift[k, g, t][0]
                    acc = acc + _pair_sum(pat.kt[k, t][0], pat.G[f], SV[g, t][lift].transpose(0, 2, 1) @ UtT[t])
                SB[g, k] = -acc
            for t in pat.tail:                                                     # Σ(tail, k) per pair
                lk, lt = pat.kt[k, t][0], pat.kt[k, t][1]
                acc = self._tail_times(ST, k, t, UtT)
                for h in pat.par[k]:
                    acc = acc + SV[h, t][pat.lift[k, h, t][0]] @ Ut[h][lk]
                SV[k, t] = -acc
            S = Li.transpose(0, 2, 1) @ Li
            for g in pat.par[k]:
                S = S - Ut[g].transpose(0, 2, 1) @ SB[g, k]
            for t in pat.tail:
                S = S - _pair_sum(pat.kt[k, t][0], pat.G[f], UtT[t].transpose(0, 2, 1) @ SV[k, t])
            SD[k] = 0.5 * (S + S.transpose(0, 2, 1))
        return Selected(pat, SD, SB, SV, ST)

    def _anc(self, SD, SB, k, g, h):
        """Σ(ancestor of k in g, ancestor of k in h) for every level of chain factor k."""
        pat = self.pat
        if g == h:
            return SD[g][pat.par[k][g]]
        if h > g:
            return SB[h, g][pat.par[k][g]].transpose(0, 2, 1)
        return SB[g, h][pat.par[k][h]]

    def _tail_times(self, ST, k, t, UtT):
        """(Σ_TT Ũ_Tk) at chain factor k's pairs with tail factor t: (pairs, q_t, q_k)."""
        pat = self.pat
        f = pat.chain[k]
        qk = pat.q[f]
        Wt = pat.coupling(k, UtT).T.tocsr()               # (G_k q_k × R)
        lk, lt = pat.kt[k, t][0], pat.kt[k, t][1]
        out = np.empty((len(lk), pat.q[t], qk))
        rows_t = pat.tail_index(t, lt)                     # (pairs, q_t)
        chunk = max(1, int(2e7 // max(pat.R * qk, 1)))
        for a in range(0, pat.G[f], chunk):
            sel = (lk >= a) & (lk < a + chunk)
            if not sel.any():
                continue
            dense = Wt[a * qk:(a + chunk) * qk] @ ST        # (chunk q_k × R)
            cols = (lk[sel] - a)[:, None] * qk + np.arange(qk)
            out[sel] = dense[cols[:, None, :], rows_t[sel][:, :, None]]
        return out


class Selected:
    """Σ = H⁻¹ on the pattern of H: per chain factor its diagonal blocks (SD), its blocks with its
    ancestors (SB), with the tail per pair (SV), and the dense tail (ST)."""

    def __init__(self, pat, SD, SB, SV, ST):
        self.pat, self.SD, self.SB, self.SV, self.ST = pat, SD, SB, SV, ST

    def diagonal_blocks(self) -> list:
        """Σ's q_f × q_f block of every level of every factor: ``out[f]`` of shape (G_f, q_f, q_f)."""
        pat = self.pat
        out = [None] * len(pat.G)
        for k, f in enumerate(pat.chain):
            out[f] = self.SD[k]
        for t in pat.tail:
            idx = pat.tail_index(t, np.arange(pat.G[t]))
            out[t] = self.ST[idx[:, :, None], idx[:, None, :]]
        return out

    def row_products(self, M: list) -> list:
        """Y[f][j] = (Σ m_j) restricted to row j's level of factor f, for every row (``M[f]``: (n, q_f))."""
        pat = self.pat
        Y = [np.zeros_like(Mf) for Mf in M]
        for k, f in enumerate(pat.chain):
            c = pat.codes[f]
            Y[f] += np.einsum("jab,jb->ja", self.SD[k][c], M[f])
            for g in pat.par[k]:                       # block (g, k) at row j: SB[g, k][c_k]
                blk = self.SB[g, k][c]                 # (n, q_g, q_k)
                Y[pat.chain[g]] += np.einsum("jab,jb->ja", blk, M[f])
                Y[f] += np.einsum("jba,jb->ja", blk, M[pat.chain[g]])
            for t in pat.tail:
                blk = self.SV[k, t][pat.kt[k, t][2]]   # (n, q_t, q_k)
                Y[t] += np.einsum("jab,jb->ja", blk, M[f])
                Y[f] += np.einsum("jba,jb->ja", blk, M[t])
        for t in pat.tail:
            it = pat.tail_index(t, pat.codes[t])
            for s in pat.tail:
                js = pat.tail_index(s, pat.codes[s])
                Y[t] += np.einsum("jab,jb->ja", self.ST[it[:, :, None], js[:, None, :]], M[s])
        return Y


def _rows(agg: sp.csr_matrix, blocks: np.ndarray) -> np.ndarray:
    """Sum the blocks (N, a, b) into (agg.shape[0], a, b) by ``agg``."""
    out = agg @ blocks.reshape(blocks.shape[0], -1)
    return np.asarray(out).reshape(agg.shape[0], *blocks.shape[1:])


def _pair_sum(level: np.ndarray, size: int, blocks: np.ndarray) -> np.ndarray:
    """Sum per-pair blocks (pairs, a, b) into per-level blocks (size, a, b) by the pairs' level."""
    return _rows(aggregator(level, size), blocks)


class FactorLayout:
    """The layout of a design's grouping factors that the several-factor engines share (a mixin): each
    factor's name, levels, codes and Z columns, the sparsity :class:`Pattern`, per-level aggregators, and
    each θ entry's factor and its row and column within the factor."""

    def _set_factor_layout(self, design) -> None:
        facs = design.groupings
        self.names = [f.name for f in facs]
        self.levels = [list(f.levels) for f in facs]
        self.codes = [np.asarray(f.codes, dtype=np.int64) for f in facs]
        self.cols = [np.asarray(f.columns) for f in facs]
        self.G = [len(lv) for lv in self.levels]
        self.pat = Pattern(self.codes, self.G, [len(c) for c in self.cols])
        self.agg = [aggregator(c, g) for c, g in zip(self.codes, self.G)]
        self.theta_r, self.theta_c = theta_index(design.theta_mask)
        self.ntheta = len(self.theta_r)
        self.theta_f = np.array([next(i for i, c in enumerate(self.cols) if col in c) for col in self.theta_c], int)
        self.theta_lc = np.array([int(np.flatnonzero(self.cols[f] == col)[0])
                                  for f, col in zip(self.theta_f, self.theta_c)], int)
        self.theta_lr = np.array([int(np.flatnonzero(self.cols[f] == row)[0])
                                  for f, row in zip(self.theta_f, self.theta_r)], int)


def _cho_solve(factor, b):
    """scipy.linalg.cho_solve, imported on first use (a fit with one grouping factor needs none of
    scipy.linalg, whose import costs a small fit a few hundredths of a second)."""
    from scipy.linalg import cho_solve

    return cho_solve(factor, b)
