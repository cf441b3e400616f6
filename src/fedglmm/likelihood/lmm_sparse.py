"""Exact linear mixed model sums with several grouping factors (nested or crossed), as lme4's ``lmer``.

The model and the profiled criterion are those of :mod:`fedglmm.likelihood.lmm`: y ~ N(Xβ, σ²V),
V = I + ZΛΛᵀZᵀ, and the coordinator profiles β and σ out of the summed

    A = XᵀV⁻¹X,  b = XᵀV⁻¹y,  c = yᵀV⁻¹y,  d = log det V.

With H = ΛᵀZᵀZΛ + I (sparse, factored by :mod:`fedglmm.likelihood.sparse`) and F = ΛᵀZᵀ[X y],
Woodbury gives [X y]ᵀV⁻¹[X y] = [X y]ᵀ[X y] − FᵀH⁻¹F and log det V = log det H (Bates et al. 2015,
J. Stat. Softw. 67(1), sec. 3).  With R = H⁻¹F and, for θ_t = Λ_f(r, c), G = Z_fᵀ[X y] and
Q = Z_fᵀZΛR per level of f,

    d(FᵀH⁻¹F)/dθ_t = S + Sᵀ − (T + Tᵀ),   S = Σ_ℓ G[ℓ, r]ᵀ R_f[ℓ, c],   T = Σ_ℓ R_f[ℓ, c]ᵀ Q[ℓ, r],
    d log det H/dθ_t = 2 Σ_j z_{f,j,r} Y_f[j, c]     (Y: H⁻¹ on the pattern of H, as in the GLMM engine).

The second θ-derivatives are central differences of these analytic first derivatives, computed inside
the site (local work, never a round).
"""
from __future__ import annotations

import numpy as np

from ..model.spec import Design
from .sparse import FactorLayout


class MultiLMMSums(FactorLayout):
    """One site's A, b, c, d with θ-derivatives, for a model with several grouping factors."""

    def __init__(self, design: Design, X: np.ndarray | None = None, nobs: int | None = None):
        """``nobs``: the number of observations when the rows are stand-ins with the same cross-products
        (one-shot cells, :mod:`fedglmm.coordinator.virtual`); default: the rows.  Precision weights w
        (``design.weighted``) scale each row by √w, as in :class:`~fedglmm.likelihood.lmm.LMMSums` (the
        ½ Σ log w of the likelihood comes with the set-up sums); rows of weight 0 count for nothing."""
        X = np.asarray(design.X if X is None else X, float)
        y = np.asarray(design.y, float) - np.asarray(design.offset, float)
        self.Z = np.asarray(design.Z, float)
        self.n, self.p = X.shape
        self.nobs = self.n if nobs is None else int(nobs)
        if getattr(design, "weighted", False):
            w = np.asarray(design.trials, float)
            r = np.sqrt(w)
            X, y, self.Z = X * r[:, None], y * r, self.Z * r[:, None]
            self.nobs = int(np.sum(w > 0)) if nobs is None else self.nobs
        self.Xy = np.c_[X, y]
        self._set_factor_layout(design)
        self.cross = self.Xy.T @ self.Xy
        # Z_fᵀ[X y] per level (θ-free)
        self.ZtXy = [_rows(a, self.Z[:, c][:, :, None] * self.Xy[:, None, :]) for a, c in zip(self.agg, self.cols)]

    def lambdas(self, theta):
        lam = np.zeros((self.Z.shape[1],) * 2)
        lam[self.theta_r, self.theta_c] = theta
        return [lam[np.ix_(c, c)] for c in self.cols]

    def _at(self, theta):
        lams = self.lambdas(np.asarray(theta, float))
        M = [self.Z[:, c] @ lam for c, lam in zip(self.cols, lams)]
        H = self.pat.factor(self.pat.assemble(np.ones(self.n), M))
        F = [lam.T @ g for lam, g in zip(lams, self.ZtXy)]                 # ΛᵀZᵀ[X y] per level
        R = H.solve(F)
        return lams, M, H, F, R

    def _first(self, theta) -> dict:
        """A, b, c, d and their first θ-derivatives."""
        lams, M, H, F, R = self._at(theta)
        p = self.p
        K = sum(np.einsum("gap,gaq->pq", f, r) for f, r in zip(F, R))
        out = _split(self.cross - K, p)
        out["d"] = H.logdet
        k = self.ntheta
        if k == 0:
            return out
        ZLR = sum(np.einsum("jc,jcp->jp", Mf, Rf[c]) for Mf, Rf, c in zip(M, R, self.codes))    # ZΛR rows
        Y = H.selected_inverse().row_products(M)
        dK = np.empty((k, p + 1, p + 1))
        dd = np.empty(k)
        for t in range(k):
            f, r, c = self.theta_f[t], self.theta_lr[t], self.theta_lc[t]
            Q = self.agg[f] @ (self.Z[:, self.theta_r[t]][:, None] * ZLR)              # (G_f, p+1)
            S = self.ZtXy[f][:, r, :].T @ R[f][:, c, :]
            T = R[f][:, c, :].T @ Q
            dK[t] = S + S.T - T - T.T
            dd[t] = 2.0 * np.sum(self.Z[:, self.theta_r[t]] * Y[f][:, c])
        out.update({"dA": -dK[:, :p, :p], "db": -dK[:, :p, p], "dc": -dK[:, p, p], "dd": dd})
        return out

    def evaluate(self, theta: np.ndarray, order: int = 2, step: float = 1e-5, central: bool = True) -> dict:
        """A, b, c, d at θ and, for order ≥ 1 / 2, their first (analytic) and second (central or forward
        differences of the first) θ-derivatives; for order 3 (central differences) also the third
        (:func:`differenced`)."""
        theta = np.asarray(theta, float)
        out = self._first(theta) if order >= 1 else self._zeroth(theta)
        out["n"] = self.nobs
        if order < 2 or self.ntheta == 0:
            return out
        first = lambda a: self._first(theta + a)                          # noqa: E731
        out.update(differenced(first, out, step * (1.0 + np.abs(theta)), central or order >= 3, order >= 3))
        return out

    def _zeroth(self, theta) -> dict:
        _, _, H, F, R = self._at(theta)
        K = sum(np.einsum("gap,gaq->pq", f, r) for f, r in zip(F, R))
        out = _split(self.cross - K, self.p)
        out["d"] = H.logdet
        return out

    def conditional_modes(self, theta, beta, sigma) -> tuple[dict, dict]:
        """Each factor's conditional means b̂_f = Λ_f (R_y − R_X β̂) and SDs σ sqrt(diag(Λ_f Σ_ff Λ_fᵀ))."""
        lams, M, H, F, R = self._at(theta)
        diag = H.selected_inverse().diagonal_blocks()
        coef = np.r_[-np.asarray(beta, float), 1.0]
        modes, sds = {}, {}
        for name, lam, Rf, S in zip(self.names, lams, R, diag):
            modes[name] = (Rf @ coef) @ lam.T
            cov = lam @ S @ lam.T
            sds[name] = sigma * np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0))
        return modes, sds

    def mode_derivatives(self, theta, beta, sigma, step: float = 1e-5) -> tuple[dict, dict]:
        """The derivatives of each factor's modes and SDs in (θ, β, σ), (G_f, q_f, k + p + 1) by factor name:
        in θ central differences (step 1e-5 (1 + |θ_t|)), in β and σ exact (b̂ is linear in β, the SDs in
        σ).  The coordinator moves the modes, computed at the final round's θ with β̂ and σ̂ predicted
        there, to its estimate (θ̂, β̂, σ̂)."""
        theta, beta = np.asarray(theta, float), np.asarray(beta, float)
        k, P = self.ntheta, self.ntheta + self.p + 1
        lams, _, _, _, R = self._at(theta)
        modes, sds = self.conditional_modes(theta, beta, sigma)
        dm = {f: np.zeros(m.shape + (P,)) for f, m in modes.items()}
        ds = {f: np.zeros(m.shape + (P,)) for f, m in sds.items()}
        for t in range(k):
            h = step * (1.0 + abs(theta[t]))
            e = np.zeros(k)
            e[t] = h
            (mp, sp), (mm, sm) = (self.conditional_modes(theta + e, beta, sigma),
                                  self.conditional_modes(theta - e, beta, sigma))
            for f in dm:
                dm[f][:, :, t], ds[f][:, :, t] = (mp[f] - mm[f]) / (2.0 * h), (sp[f] - sm[f]) / (2.0 * h)
        for f, lam, Rf in zip(self.names, lams, R):
            dm[f][:, :, k:k + self.p] = -np.einsum("ab,gbp->gap", lam, Rf[:, :, :self.p])
            ds[f][:, :, -1] = sds[f] / sigma if sigma > 0 else 0.0
        return dm, ds

    # --- the engine interface (see :mod:`fedglmm.likelihood.engine`) ----------------------------
    third = True        # a site's engine; a local fit's (LocalEvaluator) is set to False

    def sums(self, point: np.ndarray, final: bool = False) -> dict:
        """A site's sums come with their third derivatives, for the coordinator's cubic model
        (:mod:`fedglmm.likelihood.third_order`): k more evaluations of the first derivatives (k² with k ≥ 3
        θ's), and a round fewer on most splits.  A local fit (``third`` False), where a point costs what a round
        does, takes forward differences while it iterates and central ones at the estimate (``final``)."""
        return self.evaluate(point, order=3) if self.third else self.evaluate(point, order=2, central=final)

    def modes(self, point: np.ndarray, beta=None, sigma=None) -> tuple[dict, dict]:
        return self.conditional_modes(point, np.asarray(beta), float(sigma))


FIRST = ("dA", "db", "dc", "dd")


def differenced(first, base: dict, hs: np.ndarray, central: bool = True, third: bool = False) -> dict:
    """The second θ-derivatives (``d2A``, ``d2b``, ``d2c``, ``d2d``) of sums whose first ones ``first(a)``
    gives at θ + a ({dA, db, dc, dd}; ``base`` at θ), by central or forward differences with steps ``hs``;
    with ``third`` (central) also the third (``d3A``...): the second differences at the same points give the
    entries with at most two distinct indices, two more points per pair of θ's, θ ± (h_t e_t + h_u e_u),
    those with three -- (f₊₊ + f₋₋ − f₊ₜ − f₋ₜ − f₊ᵤ − f₋ᵤ + 2f) / (2 h_t h_u) (:func:`third_from_differences`)."""
    k = len(hs)
    second, curve, ends = {key: [] for key in FIRST}, {key: [] for key in FIRST}, {}
    for t in range(k):
        e = np.zeros(k)
        e[t] = hs[t]
        up = first(e)
        dn, width = (first(-e), 2.0 * hs[t]) if central else (base, hs[t])
        ends[t] = (up, dn)
        for key in FIRST:
            second[key].append((np.asarray(up[key]) - np.asarray(dn[key])) / width)
            if third:
                curve[key].append((np.asarray(up[key]) - 2.0 * np.asarray(base[key]) + np.asarray(dn[key]))
                                  / hs[t] ** 2)
    mixed = {}
    for t in range(k if third and k >= 3 else 0):
        for u in range(t + 1, k):
            a = np.zeros(k)
            a[t], a[u] = hs[t], hs[u]
            pp, mm = first(a), first(-a)
            mixed[t, u] = {key: (np.asarray(pp[key]) + np.asarray(mm[key]) - sum(np.asarray(x[key]) for x in
                                 (*ends[t], *ends[u])) + 2.0 * np.asarray(base[key])) / (2.0 * hs[t] * hs[u])
                           for key in FIRST}
    out = {}
    for key, rows in second.items():
        arr = np.stack(rows, axis=1)                              # (k_s, k_t, ...): d/dθ_t of d?/dθ_s
        out["d2" + key[1:]] = 0.5 * (arr + np.swapaxes(arr, 0, 1))
        if third:
            out["d3" + key[1:]] = third_from_differences(np.stack(curve[key], axis=1),
                                                         {tu: m[key] for tu, m in mixed.items()})
    return out


def third_from_differences(curve: np.ndarray, mixed: dict) -> np.ndarray:
    """The third θ-derivatives (k, k, k, ...) from ``curve[v, t]`` = ∂²/∂θ_t² of the first derivative in θ_v
    (second differences at the central points: every entry with at most two distinct indices, D[t, t, v]
    and its permutations) and, with k ≥ 3, ``mixed[t, u][v]`` = ∂²/∂θ_t∂θ_u of it (the entries with three
    distinct indices, each the mean of the three pairs that give it)."""
    k = curve.shape[0]
    out = np.zeros((k, k, k) + curve.shape[2:])
    for t in range(k):
        for v in range(k):
            out[t, t, v] = out[t, v, t] = out[v, t, t] = curve[v, t]
    for a in range(k):
        for b in range(a + 1, k):
            for c in range(b + 1, k):
                m = (mixed[a, b][c] + mixed[a, c][b] + mixed[b, c][a]) / 3.0
                for i, j, l in ((a, b, c), (a, c, b), (b, a, c), (b, c, a), (c, a, b), (c, b, a)):
                    out[i, j, l] = m
    return out


def _split(K: np.ndarray, p: int) -> dict:
    return {"A": K[:p, :p].copy(), "b": K[:p, p].copy(), "c": float(K[p, p])}


def _rows(agg, a: np.ndarray) -> np.ndarray:
    out = agg @ a.reshape(a.shape[0], -1)
    return np.asarray(out).reshape(agg.shape[0], *a.shape[1:])
