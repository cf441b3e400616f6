"""One site's part of a GLMM's Laplace approximation when levels of grouping factors are shared by sites
(binomial and poisson; observed curvature, which is the Fisher one for their canonical links).

Notation: :mod:`fedglmm.likelihood.shared` (v, Λ_v, Z_v) and :mod:`fedglmm.likelihood.multilevel`.  For site
s let ψ = (b, β, θ), b = Λ_v v its shared effects on the (internal) data scale, treated by the site as
fixed coefficients of its columns Z_v; its local problem given ψ is its own:

    h*_s(ψ) = max_u Σ_j ℓ_j(η_j) − ½‖u‖²   (u: the site's own random effects, û(ψ) its modes),
    H_s = ΛᵀZᵀWZΛ + I over u at û,    S_s = Z_vᵀWZ_v − Z_vᵀWMH_s⁻¹MᵀWZ_v = −∂²h*_s/∂b²  (M = Z_u Λ_u),

S_s being the Schur complement of the local effects in the joint curvature.  The joint Laplace
approximation over (u_1, …, u_S, v) is then (the arrow structure: the sites couple through v alone)

    ℓ(β, θ) = Σ_s h*_s(ψ̂) − ½‖v̂‖² − ½ Σ_s log det H_s − ½ log det C,    C = I + Λ_vᵀ (Σ_s S_s) Λ_v,

at the joint mode v̂ (:mod:`fedglmm.likelihood.glmm_shared_pool` combines the sites' sums).  A site answers,
at each point ψ the coordinator sends with a matrix Γ (its guess of Λ_v C⁻¹ Λ_vᵀ there):

* ``h``, ``gh``, ``Hh``: h*_s, its gradient and Hessian in ψ -- ∇h* = Eᵀℓ′ (E = ∂η/∂ψ at fixed u),
  ∇²h* = Eᵀdiag(ℓ″)E + Kᵀ dû/dψ with K = ∂(∇_u h)/∂ψ and H dû/dψ = K (implicit function);
* ``l``, ``gl``: log det H_s and its gradient in ψ (as in :mod:`fedglmm.likelihood.multilevel`);
* ``gc``: the gradient in ψ of ⟨Γ, S_s⟩.  With k̃_j = dη̂_j/db (row j's shared design with the local
  effects eliminated) and R = H⁻¹MᵀWZ_v, the derivative of a Schur complement gives
  dS_s = Σ_j dw_j k̃_j k̃_jᵀ − RᵀdMᵀWK − KᵀW dM R, so
  ∂⟨Γ, S_s⟩/∂ψ = Σ_j w′_j (dη̂_j/dψ) k̃_jᵀΓk̃_j − [ψ = θ_t = Λ(r, c)] 2 Σ_j w_j z_{j,r} (RΓk̃_j)_c.

Every number is a sum over the site's rows and its own levels: (Q_s + p + k)² per point, never a
number per row.  The derivatives are checked against central differences in ``tests/test_shared_glmm.py``.
"""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from ..model.spec import Design
from .multilevel import MultiLevelGLMM, _rows
from .shared import SharedLayout, SiteSplit, embed, split_design

GLMM_SHARED_KEYS = ("n", "h", "l", "gh", "gl", "gc", "Hh")
_AXES = {"gh": (0,), "gl": (0,), "gc": (0,), "Hh": (0, 1)}


class SharedGLMMSums:
    """One site's sums for a binomial or poisson model with shared levels (see the module docstring)."""

    def __init__(self, design: Design, family: Family, layout: SharedLayout):
        weight = design.trials if family.name == "binomial" else None
        self.split: SiteSplit = split_design(design, layout, weight)
        self.Q, self.Qs, self.p = layout.Q, len(self.split.cols), design.X.shape[1]
        self.inner = MultiLevelGLMM(self.split.local, family, X=np.c_[self.split.Zv, design.X],
                                    curvature="observed")
        self.k = self.inner.ntheta
        self.n = design.n

    def _psi(self, point: np.ndarray) -> np.ndarray:
        """The site's ψ = (b_s, β, θ) from a global point (b [Q], β, θ)."""
        point = np.asarray(point, float)
        return np.r_[point[self.split.cols], point[self.Q:]]

    def pieces(self, psi: np.ndarray, gamma: np.ndarray | None = None) -> dict:
        """h*, log det H and their derivatives at the site's ψ (warm-started modes kept in ``inner.u``)."""
        m = self.inner
        fam = m.family
        beta_ext, theta = psi[: self.Qs + self.p], psi[self.Qs + self.p:]
        eta0 = m.X @ beta_ext + m.off
        lams = m.lambdas(theta)
        M = [m.Z[:, c] @ lam for c, lam in zip(m.cols, lams)]
        u, eta = m._modes(eta0, M, m.u)
        d1, d2, _, _ = fam.derivs(m.y, m.m, eta)
        w, w1, _ = fam.curvature(m.y, m.m, eta, "observed")
        H = m.pat.factor(m.pat.assemble(w, M))
        E = m._deta_fixed_u(u)
        K = [_rows(a, (d2[:, None, None] * Mf[:, :, None]) * E[:, None, :]) for a, Mf in zip(m.agg, M)]
        for t in range(self.k):
            f, r = m.theta_f[t], m.theta_r[t]
            K[f][:, m.theta_lc[t], m.p + t] += m.agg[f] @ (d1 * m.Z[:, r])
        dU = H.solve(K)
        deta = E + sum(np.einsum("jc,jcp->jp", Mf, d[c]) for Mf, d, c in zip(M, dU, m.codes))
        Hh = E.T @ (d2[:, None] * E) + sum(np.einsum("gap,gaq->pq", c, d) for c, d in zip(K, dU))
        Y = H.selected_inverse().row_products(M)
        lev = sum(np.sum(Mf * Yf, axis=1) for Mf, Yf in zip(M, Y))
        gl = (w1 * lev) @ deta
        for t in range(self.k):
            f = m.theta_f[t]
            gl[m.p + t] += 2.0 * np.sum(w * m.Z[:, m.theta_r[t]] * Y[f][:, m.theta_lc[t]])
        h = float(np.sum(fam.loglik(m.y, m.m, eta))) - 0.5 * sum(float(np.sum(x * x)) for x in u) + m.const
        out = {"h": h, "l": float(H.logdet), "gh": E.T @ d1, "gl": gl, "Hh": 0.5 * (Hh + Hh.T),
               "u": u, "dU": dU, "H": H, "lams": lams}
        if gamma is not None:
            out["gc"] = self._gc(np.asarray(gamma, float), deta, dU, w, w1)
        return out

    def _gc(self, gamma, deta, dU, w, w1) -> np.ndarray:
        """∂⟨Γ, S_s⟩/∂ψ (see the module docstring); ``gamma`` over the site's shared columns."""
        m, Qs = self.inner, self.Qs
        if Qs == 0:
            return np.zeros(deta.shape[1])
        Kt = deta[:, :Qs]                                  # k̃_j
        KG = Kt @ gamma
        gc = (w1 * np.sum(KG * Kt, axis=1)) @ deta
        for t in range(self.k):
            f = m.theta_f[t]
            R = -dU[f][:, :, :Qs]                          # H⁻¹MᵀWZ_v per level of f
            RGk = np.einsum("jaq,jq->ja", R[m.codes[f]], KG)
            gc[m.p + t] -= 2.0 * np.sum(w * m.Z[:, m.theta_r[t]] * RGk[:, m.theta_lc[t]])
        return gc

    # --- the engine interface -------------------------------------------------------------------
    def sums(self, point: np.ndarray, final: bool = False, gamma=None) -> dict:
        """The reply at a global point (b, β, θ) for the coordinator's Γ (``gamma``, Q × Q), in the site's
        own layout (its shared columns ``scols``, then β, θ)."""
        cols = self.split.cols
        g = None if gamma is None else np.asarray(gamma, float)[np.ix_(cols, cols)]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                pc = self.pieces(self._psi(point), np.zeros((self.Qs, self.Qs)) if g is None else g)
            except (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError, ValueError):
                pc = None
        P = self.Qs + self.p + self.k
        if pc is None or not (np.isfinite(pc["h"]) and np.isfinite(pc["l"]) and np.all(np.isfinite(pc["Hh"]))):
            self.inner.u = [np.zeros_like(x) for x in self.inner.u]
            pc = {"h": np.nan, "l": np.nan, "gh": np.full(P, np.nan), "gl": np.full(P, np.nan),
                  "gc": np.full(P, np.nan), "Hh": np.full((P, P), np.nan)}
        else:
            self.inner.u = pc["u"]
        out = {k: pc[k] for k in ("h", "l", "gh", "gl", "gc", "Hh")}
        out.update({"n": self.n, "scols": cols.astype(np.int64)})
        return out

    def to_global(self, reply: dict) -> dict:
        return to_global(reply, self.Q)

    def modes(self, point, beta=None, sigma=None, shared=None) -> tuple[dict, dict]:
        """The local levels' conditional modes b̂ = Λû and SDs, by factor, given the shared effects in
        ``point``: the local curvature's inverse plus the shared part RΓRᵀ (the joint inverse's local
        block), ``shared`` = (b̂_v, Γ) over all Q shared effects."""
        cols = self.split.cols
        gamma = np.zeros((self.Q, self.Q)) if shared is None else np.asarray(shared[1], float)
        base = self.pieces(self._psi(point))
        diag = base["H"].selected_inverse().diagonal_blocks()
        modes, sds = {}, {}
        for f, (name, lam, uf, S) in enumerate(zip(self.inner.names, base["lams"], base["u"], diag)):
            keep = np.arange(len(self.split.local_levels[name]))
            cov = S
            if self.Qs:
                R = -base["dU"][f][:, :, :self.Qs]
                cov = S + np.einsum("gaq,qr,gbr->gab", R, gamma[np.ix_(cols, cols)], R)
            cov = lam @ cov @ lam.T
            modes[name] = (uf @ lam.T)[keep]
            sds[name] = np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0))[keep]
        return modes, sds

    def mode_derivatives(self, point, beta=None, sigma=None, points=None, gammas=None) -> tuple[dict, dict | None]:
        """The derivatives of the local levels' modes b̂ = Λû in the site's ψ = (b_s, β, θ), (G_f, q_f,
        Q_s + p + k) by factor: Λ dû/dψ, plus û's column for the θ of Λ's entry; the coordinator turns them into
        derivatives in φ along v̂'s tangent (:class:`~fedglmm.coordinator.shared_glmm_rounds.SharedGLMMEvaluator`).
        With the final round's ``points`` and ``gammas`` (the point, then its difference points
        (b ± h_j Λτ̄_j, φ ± h_j e_j) with Γ̂ at each), also the SDs' derivatives in φ along the tangent
        (G_f, q_f, P): central differences of the SDs at those points, where Γ̂ has moved as well."""
        dm = self._local_mode_derivatives(point)
        if points is None or gammas is None:
            return dm, None
        points, P = np.asarray(points, float), len(point) - self.Q
        ds = {f: np.zeros(d.shape[:2] + (P,)) for f, d in dm.items()}
        for j in range(P):
            (_, up), (_, dn) = (self.modes(points[i], shared=(None, gammas[i])) for i in (1 + 2 * j, 2 + 2 * j))
            width = points[1 + 2 * j][self.Q + j] - points[2 + 2 * j][self.Q + j]
            for f in ds:
                ds[f][:, :, j] = (up[f] - dn[f]) / width
        return dm, ds

    def _local_mode_derivatives(self, point) -> dict:
        m, base = self.inner, self.pieces(self._psi(point))
        off = self.Qs + self.p
        out = {}
        for f, (name, lam, uf, dU) in enumerate(zip(m.names, base["lams"], base["u"], base["dU"])):
            db = np.einsum("ab,gbp->gap", lam, dU)
            for t in np.flatnonzero(m.theta_f == f):
                db[:, m.theta_lr[t], off + t] += uf[:, m.theta_lc[t]]
            out[name] = db[: len(self.split.local_levels[name])]
        return out


def to_global(reply: dict, Q: int) -> dict:
    """A site's reply in its own layout (``scols``) placed in the global one (v's Q columns, then β, θ),
    where the sites' replies add up; a reply without ``scols`` is returned as it is."""
    if "scols" not in reply:
        return reply
    cols = np.asarray(reply["scols"], dtype=np.int64)
    out = {k: v for k, v in reply.items() if k != "scols"}
    for key, axes in _AXES.items():
        out[key] = embed(np.asarray(reply[key], float), cols, Q, axes)
    return out
