"""Exact linear mixed model sums when levels of grouping factors are shared by sites (gaussian, ML/REML).

Model and criterion as in :mod:`fedglmm.likelihood.lmm`; notation of the shared effects v, Λ_v, Z_v in
:mod:`fedglmm.likelihood.shared`.  With V_u = I + Z_u Λ_u Λ_uᵀ Z_uᵀ the covariance (over σ²) of a site's
rows given v -- block-diagonal over sites -- the whole covariance is V = V_u + Z_v Λ_v Λ_vᵀ Z_vᵀ, and by
Woodbury

    [X y]ᵀ V⁻¹ [X y] = G_xx − G_xv Λ_v C⁻¹ Λ_vᵀ G_vx,     log det V = Σ_s log det V_u,s + log det C,
    C = I + Λ_vᵀ G_vv Λ_v,     G = Σ_s [Z_v X y]ᵀ V_u,s⁻¹ [Z_v X y]   (over each site's rows).

So a site sends G_s -- its local LMM sums with its shared columns Z_v as extra fixed-effect columns (the
sums A, b, c of :mod:`fedglmm.likelihood.lmm_sparse` for the design [Z_v X]) -- and log det V_u,s, with
their first and second θ-derivatives (θ enters V_u through the local levels), placed in the global
layout of v (:func:`fedglmm.likelihood.shared.embed`) so that they add up over sites and can travel
masked: (Q + p + 1)² numbers each, never a number per row.  The coordinator sums them, adds Λ_v and gets the exact A = XᵀV⁻¹X, b, c, d and their
θ-derivatives (:func:`pooled_sums`): the profiled REML/ML criterion then follows as with local levels
only.  First θ-derivatives are analytic (below); second ones are central differences of them, the sums
moved along their own second-order Taylor expansion (exact to O(h²)).  With N = Λ_v C⁻¹ Λ_vᵀ,

    dC = dΛᵀ G_vv Λ + Λᵀ G_vv dΛ + Λᵀ dG_vv Λ,   dN = dΛ C⁻¹ Λᵀ + Λ C⁻¹ dΛᵀ − Λ C⁻¹ dC C⁻¹ Λᵀ,
    d[G_xx − G_xv N G_vx] = dG_xx − dG_xv N G_vx − G_xv N dG_vx − G_xv dN G_vx,   d log det C = tr(C⁻¹ dC).

Conditional modes: b̂_v = N (G_vy − G_vX β̂) and Var(b_v | y) = σ² N (the coordinator's); a site's local
modes are those of its local model with b̂_v as fixed coefficients of Z_v, and their variances add the
shared part R N Rᵀ (R: the local effects' regression on Z_v).
"""
from __future__ import annotations

import numpy as np

from ..model.spec import Design
from .lmm_sparse import MultiLMMSums, differenced
from .shared import SharedLambda, SharedLayout, SiteSplit, embed, split_design

SUM_KEYS = ("n", "sG", "sdG", "sd2G", "sd3G", "sd", "sdd", "sd2d", "sd3d")


class SharedLMMSums:
    """One site's shared-model sums (see the module docstring) on the internal scale: the engine of
    :mod:`fedglmm.likelihood.engine` for a gaussian model with shared levels.  Its sums are placed in
    the global layout (v's Q columns, then X, then y), so that the sites' replies add up (and can travel
    masked); the rows never leave."""

    def __init__(self, design: Design, layout: SharedLayout):
        self.split: SiteSplit = split_design(design, layout)
        self.p = design.X.shape[1]
        self.Q = layout.Q
        self.inner = MultiLMMSums(self.split.local, X=np.c_[self.split.Zv, design.X])
        self.n = design.n

    def sums(self, point: np.ndarray, final: bool = False) -> dict:
        """G_s, log det V_u,s and their θ-derivatives (first analytic, second by differences), over the
        site's own shared columns (``scols``: their positions in v; :func:`to_global` places them)."""
        s = self.inner.evaluate(np.asarray(point, float), order=3)
        k = self.inner.ntheta
        width = s["A"].shape[0] + 1
        out = {"n": self.n, "scols": self.split.cols.astype(np.int64), "sG": _pack(s["A"], s["b"], s["c"]),
               "sd": float(s["d"])}
        if k:
            out["sdG"] = np.stack([_pack(s["dA"][t], s["db"][t], s["dc"][t]) for t in range(k)])
            out["sd2G"] = np.stack([[_pack(s["d2A"][a, t], s["d2b"][a, t], s["d2c"][a, t]) for t in range(k)]
                                    for a in range(k)])
            out["sd3G"] = np.stack([[[_pack(s["d3A"][a, b, t], s["d3b"][a, b, t], s["d3c"][a, b, t])
                                      for t in range(k)] for b in range(k)] for a in range(k)])
            out["sdd"], out["sd2d"], out["sd3d"] = (np.asarray(s[key], float) for key in ("dd", "d2d", "d3d"))
        else:
            out["sdG"], out["sd2G"] = np.zeros((0, width, width)), np.zeros((0, 0, width, width))
            out["sd3G"], out["sd3d"] = np.zeros((0, 0, 0, width, width)), np.zeros((0, 0, 0))
            out["sdd"], out["sd2d"] = np.zeros(0), np.zeros((0, 0))
        return out

    def modes(self, point, beta=None, sigma=None, shared=None):
        """The local levels' conditional modes and SDs by factor (internal scale), given β̂ (``beta``), σ̂ and
        ``shared`` = (b̂_v, N) over all Q shared effects (the coordinator's: the shared modes and
        Var(b_v | y) / σ²).  A local level's SD adds the shared part R N Rᵀ (R: the local effects'
        regression on Z_v)."""
        cols = self.split.cols
        bv, N = (np.zeros(self.Q), None) if shared is None else (np.asarray(shared[0], float), shared[1])
        Ns = None if N is None else np.asarray(N, float)[np.ix_(cols, cols)]
        beta_ext = np.r_[bv[cols], np.asarray(beta, float)]
        inner = self.inner
        lams, M, H, F, R = inner._at(np.asarray(point, float))
        diag = H.selected_inverse().diagonal_blocks()
        coef = np.r_[-beta_ext, 1.0]
        Qs = len(cols)
        modes, sds = {}, {}
        for name, lam, Rf, S in zip(inner.names, lams, R, diag):
            keep = np.arange(len(self.split.local_levels[name]))
            modes[name] = ((Rf @ coef) @ lam.T)[keep]
            cov = S
            if Qs and Ns is not None:
                Rv = Rf[:, :, :Qs]                                # (G_f, q_f, Q_s): local on shared
                cov = S + np.einsum("gaq,qr,gbr->gab", Rv, Ns, Rv)
            cov = lam @ cov @ lam.T
            sds[name] = (float(sigma) * np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0)))[keep]
        return modes, sds

    def mode_derivatives(self, point, beta=None, sigma=None, shared=None, step: float = 1e-5) -> tuple[dict, dict]:
        """The derivatives of the local levels' modes and SDs in (θ, the site's shared columns of b̂_v, β, σ),
        (G_f, q_f, k + Q_s + p + 1) by factor: the modes' from :meth:`MultiLMMSums.mode_derivatives` in the
        extended fixed effects (b_v, β); the SDs' in θ by central differences with the coordinator's N held
        (it adds what N's own change does), in σ exact.  The coordinator chains them through b̂_v."""
        cols, point = self.split.cols, np.asarray(point, float)
        bv = np.zeros(self.Q) if shared is None else np.asarray(shared[0], float)
        dm, ds = self.inner.mode_derivatives(point, np.r_[bv[cols], np.asarray(beta, float)], float(sigma))
        for t in range(len(point)):
            h = step * (1.0 + abs(point[t]))
            e = np.zeros(len(point))
            e[t] = h
            (_, sp), (_, sm) = (self.modes(point + d, beta, sigma, shared) for d in (e, -e))
            for f in ds:
                ds[f][: len(sp[f]), :, t] = (sp[f] - sm[f]) / (2.0 * h)
        n = {f: len(self.split.local_levels[f]) for f in dm}
        return {f: d[: n[f]] for f, d in dm.items()}, {f: d[: n[f]] for f, d in ds.items()}


def to_global(reply: dict, Q: int) -> dict:
    """A site's shared sums in its own layout (with ``scols``) placed in the global one (v's Q columns,
    then X, then y), where they add up over sites; a reply without ``scols`` is returned as it is."""
    if "scols" not in reply:
        return reply
    cols = np.asarray(reply["scols"], dtype=np.int64)
    out = {k: v for k, v in reply.items() if k != "scols"}
    for key, axes in (("sG", (0, 1)), ("sdG", (1, 2)), ("sd2G", (2, 3)), ("sd3G", (3, 4))):
        out[key] = embed(np.asarray(reply[key], float), cols, Q, axes)
    return out


def _pack(A, b, c) -> np.ndarray:
    """[[A, b], [bᵀ, c]]."""
    p = A.shape[0]
    out = np.empty((p + 1, p + 1))
    out[:p, :p], out[:p, p], out[p, :p], out[p, p] = A, b, b, c
    return out


# --- at the coordinator ---------------------------------------------------------------------------------

def _carried(tot: dict, a: np.ndarray, third: bool) -> tuple:
    """(G, dG, log det V_u, its derivatives) of the summed shared sums at θ + a by their Taylor series: G to
    the second order (third with ``third``), its first derivatives to the first (second)."""
    G = tot["sG"] + np.tensordot(a, tot["sdG"], 1) + 0.5 * np.einsum("s,t,stij->ij", a, a, tot["sd2G"])
    dG = tot["sdG"] + np.einsum("t,stij->sij", a, tot["sd2G"])
    du = tot["sd"] + tot["sdd"] @ a + 0.5 * a @ tot["sd2d"] @ a
    ddu = tot["sdd"] + tot["sd2d"] @ a
    if third:
        G = G + np.einsum("r,s,t,rstij->ij", a, a, a, tot["sd3G"]) / 6.0
        dG = dG + 0.5 * np.einsum("s,t,rstij->rij", a, a, tot["sd3G"])
        du = du + np.einsum("r,s,t,rst->", a, a, a, tot["sd3d"]) / 6.0
        ddu = ddu + 0.5 * np.einsum("s,t,rst->r", a, a, tot["sd3d"])
    return G, dG, du, ddu


class SharedLMM(SharedLambda):
    """The coordinator's side: the pooled A, b, c, d (and θ-derivatives) from the summed shared sums, and
    the shared effects' conditional modes."""

    def _first(self, theta, G, dG, du, ddu):
        """(K, d, dK, dd): K = [X y]ᵀV⁻¹[X y], d = log det V and their first θ-derivatives."""
        Q = self.Q
        L = self.L(theta)
        Gvv, Gvx, Gxx = G[:Q, :Q], G[:Q, Q:], G[Q:, Q:]
        C = np.eye(Q) + L.T @ Gvv @ L
        from scipy.linalg import cho_factor, cho_solve      # on first use: a fit without shared levels needs none

        cf = cho_factor(C, lower=True)
        Ci = cho_solve(cf, np.eye(Q))
        M = L @ Ci                                           # Λ C⁻¹
        N = M @ L.T
        W1 = M.T @ Gvx                                       # C⁻¹ Λᵀ G_vx
        U = L @ W1                                           # N G_vx
        K = Gxx - Gvx.T @ U
        d = du + 2.0 * float(np.sum(np.log(np.diag(cf[0]))))
        GM = Gvv @ M
        LW = L @ W1
        dK, dd = np.empty((self.k,) + K.shape), np.empty(self.k)
        for t in range(self.k):
            dLt, dGt = self.dL[t], dG[t]
            dGvv, dGvx, dGxx = dGt[:Q, :Q], dGt[:Q, Q:], dGt[Q:, Q:]
            # dC W1 = dΛᵀ G_vv Λ W1 + Λᵀ G_vv dΛ W1 + Λᵀ dG_vv Λ W1
            dCW = dLt.T @ (Gvv @ LW) + L.T @ (Gvv @ (dLt @ W1)) + L.T @ (dGvv @ LW)
            a = (dLt.T @ Gvx).T @ W1                         # G_xv dΛ C⁻¹ Λᵀ G_vx
            dNG = a + a.T - W1.T @ dCW                        # G_xv dN G_vx
            b = dGvx.T @ U
            dK[t] = dGxx - b - b.T - dNG
            dd[t] = ddu[t] + 2.0 * float(np.sum(GM * dLt)) + float(np.sum(N * dGvv))
        return K, d, dK, dd, N, U

    def pooled_sums(self, tot: dict, theta, order: int = 2, step: float = 1e-5) -> dict:
        """The LMM sums of :mod:`fedglmm.likelihood.lmm` (n, A, b, c, d and, for order 2, their first and
        second θ-derivatives; for order 3 also the third, as :meth:`MultiLMMSums.evaluate` has them) from the
        sites' summed shared sums ``tot`` at θ: the analytic first derivatives at the sums carried along
        their Taylor series (:func:`_carried`), differenced."""
        theta = np.asarray(theta, float)
        K, d, dK, dd, _, _ = self._first(theta, tot["sG"], tot["sdG"], tot["sd"], tot["sdd"])
        p = self.p
        out = {"n": tot["n"], "A": K[:p, :p], "b": K[:p, p], "c": float(K[p, p]), "d": d}
        if order < 1 or self.k == 0:
            return out
        out.update({"dA": dK[:, :p, :p], "db": dK[:, :p, p], "dc": dK[:, p, p], "dd": dd})
        if order < 2:
            return out
        third = order >= 3 and "sd3G" in tot

        def first(a):
            """The pooled first derivatives at θ + a: {dA, db, dc, dd}."""
            _, _, dKa, dda, _, _ = self._first(theta + a, *_carried(tot, a, third))
            return {"dA": dKa[:, :p, :p], "db": dKa[:, :p, p], "dc": dKa[:, p, p], "dd": dda}

        out.update(differenced(first, out, step * (1.0 + np.abs(theta)), True, third))
        return out

    def shared_modes(self, tot: dict, theta, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """b̂_v = N (G_vy − G_vX β̂) (Q) and N (Q × Q), internal scale (Var(b_v | y) = σ² N)."""
        Q = self.Q
        G = tot["sG"]
        L = self.L(np.asarray(theta, float))
        C = np.eye(Q) + L.T @ G[:Q, :Q] @ L
        from scipy.linalg import cho_factor, cho_solve

        cf = cho_factor(C, lower=True)
        N = L @ cho_solve(cf, L.T)
        r = G[:Q, Q + self.p] - G[:Q, Q:Q + self.p] @ np.asarray(beta, float)
        return N @ r, N

    def predicted(self, tot: dict, step: np.ndarray) -> dict:
        """The summed sums moved by ``step`` in θ along their second-order Taylor expansion."""
        s = np.asarray(step, float)
        out = dict(tot)
        out["sG"] = tot["sG"] + np.tensordot(s, tot["sdG"], 1) + 0.5 * np.einsum("a,b,abij->ij", s, s, tot["sd2G"])
        out["sd"] = tot["sd"] + tot["sdd"] @ s + 0.5 * s @ tot["sd2d"] @ s
        out["sdG"] = tot["sdG"] + np.einsum("b,abij->aij", s, tot["sd2G"])
        out["sdd"] = tot["sdd"] + tot["sd2d"] @ s
        return out
