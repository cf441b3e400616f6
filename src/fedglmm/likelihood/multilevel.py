"""One site's Laplace log-likelihood of a GLMM with several grouping factors (nested or crossed).

Model and notation as in :mod:`fedglmm.likelihood.laplace`, with u holding one q_f-vector per level of
every factor f and row j touching one level of each: η_j = x_jᵀβ + o_j + Σ_f M_f[j]·u_f[c_f(j)] with
M_f = Z_f Λ_f, and

    ℓ ≈ h(û) − ½ log det H,    h(u) = Σ_j ℓ_j(η_j) − ½ ‖u‖²,    H = Σ_j w_j m_j m_jᵀ + I,

m_j being row j's column of (ZΛ)ᵀ: lme4's ``glmer(nAGQ = 1)`` objective.  H is sparse; it is factored
by :mod:`fedglmm.likelihood.sparse` (block elimination along the nested factors, a dense block for the
crossed ones), never as a dense matrix over all of the site's random effects.

The modes û come from Newton's method on h (H_obs = Σ_j −ℓ″_j m_j m_jᵀ + I), with step halving per
connected block of random effects (per top-level group of a nested design).  The gradient is analytic,
as in the single-factor engine: dû/dφ from H_obs dû = ∂(∇_u h)/∂φ, the total derivative of η at the
mode, and of −½ log det H = −½ tr(H⁻¹ dH), which needs only the entries of H⁻¹ on the pattern of H:
with Y_f[j] = (H⁻¹ m_j) at row j's level of factor f (:meth:`~fedglmm.likelihood.sparse.Selected.row_products`)
and lev_j = m_jᵀ H⁻¹ m_j,

    ∂/∂φ_p [−½ log det H] = −½ Σ_j w′_j (dη̂_j/dφ_p) lev_j − [φ_p = θ_t = Λ_f(r, c)] Σ_j w_j z_{f,j,r} Y_f[j, c].

A dispersion ψ (negative binomial, Gamma: the last coordinate of φ) enters only through ℓ_j(η_j, ψ): its
column of ∂(∇_u h)/∂φ is Σ_j ∂²ℓ_j/∂η∂ψ m_j, ∂η/∂ψ = 0 at fixed u, and the curvature weight moves by
w′_j dη̂_j/dψ − ∂³ℓ_j/∂η²∂ψ; as in :mod:`fedglmm.likelihood.laplace`.

The Hessian is the difference of the analytic gradient (the modes moved along dû/dφ and finished by one
Newton step), computed inside the site: local work, never a round -- forward differences while the
coordinator iterates, central ones at the estimate, where it gives the standard errors.  Everything is a sum over the site's rows and
levels, so sites' numbers add up when every level lives at one site.

The conditional modes and SDs at the points of the central Hessian give their derivatives in φ by central
differences (:meth:`MultiLevelGLMM.mode_derivatives`), with which the coordinator moves the final round's
modes to its estimate.
"""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from ..model.spec import Design
from .laplace import Evaluation
from .quadrature import Stencil
from .sparse import FactorLayout


class MultiLevelGLMM(FactorLayout):
    """Laplace log-likelihood of one site's rows with several grouping factors, in φ = (β, θ)."""

    def __init__(self, design: Design, family: Family, X: np.ndarray | None = None, curvature: str = "observed"):
        self.family, self.curvature = family, curvature
        self.y = np.asarray(design.y, float)
        self.m = np.asarray(design.trials, float)
        self.off = np.asarray(design.offset, float)
        self.X = np.asarray(design.X if X is None else X, float)
        self.Z = np.asarray(design.Z, float)
        self.n, self.p = self.X.shape
        self._set_factor_layout(design)
        self._components()
        self.const = family.constant(self.y, self.m)
        self.ndisp = int(family.ndisp)
        self.psi = None                      # the dispersion parameter of the current evaluation
        self.u = [np.zeros((g, len(c))) for g, c in zip(self.G, self.cols)]
        self.stencil = None                  # the gradients of the last central Hessian (quadrature.Stencil)

    def _components(self):
        """Connected blocks of random effects for step halving: a nested design's top-level groups."""
        pat = self.pat
        if pat.nested:
            top = pat.chain[-1]
            self.ncomp = self.G[top]
            self.row_comp = self.codes[top]
            self.level_comp = [None] * len(self.G)
            for k, f in enumerate(pat.chain):
                self.level_comp[f] = pat.par[k][len(pat.chain) - 1] if f != top else np.arange(self.G[f])
        else:
            self.ncomp, self.row_comp = 1, np.zeros(self.n, dtype=np.int64)
            self.level_comp = [np.zeros(g, dtype=np.int64) for g in self.G]

    @property
    def nparams(self) -> int:
        return self.p + self.ntheta + self.ndisp

    def lambdas(self, theta: np.ndarray) -> list:
        """Λ_f of every factor (its block of the block-diagonal Λ)."""
        lam = np.zeros((self.Z.shape[1],) * 2)
        lam[self.theta_r, self.theta_c] = theta
        return [lam[np.ix_(c, c)] for c in self.cols]

    def _eta(self, eta0, M, u):
        return eta0 + sum(np.einsum("jc,jc->j", Mf, uf[c]) for Mf, uf, c in zip(M, u, self.codes))

    def _h(self, eta, u):
        """h per connected block."""
        val = np.bincount(self.row_comp, self.family.loglik(self.y, self.m, eta, self.psi), self.ncomp)
        for uf, comp in zip(u, self.level_comp):
            val -= 0.5 * np.bincount(comp, np.sum(uf * uf, axis=1), self.ncomp)
        return val

    def _grad_u(self, M, d1, u):
        return [_rows(a, Mf * d1[:, None]) - uf for a, Mf, uf in zip(self.agg, M, u)]

    def _modes(self, eta0, M, u, polish: bool = False):
        """Newton on h with step halving per connected block; returns (û, η at û).  ``polish``: ``u`` is
        within O(h²) of the modes (a start moved along dû/dφ), and one full Newton step finishes them."""
        fam = self.family
        u = [x.copy() for x in u]
        eta = self._eta(eta0, M, u)
        if polish:
            d1, d2, _, _ = fam.derivs(self.y, self.m, eta, self.psi)
            step = self._newton_matrix(-d2, M).solve(self._grad_u(M, d1, u))
            u = [a + s for a, s in zip(u, step)]
            return u, self._eta(eta0, M, u)
        h = None
        for _ in range(100):
            d1, d2, _, _ = fam.derivs(self.y, self.m, eta, self.psi)
            grad = self._grad_u(M, d1, u)
            step = self._newton_matrix(-d2, M).solve(grad)
            dec = sum(np.bincount(c, np.sum(g * s, axis=1), self.ncomp) for g, s, c in zip(grad, step, self.level_comp))
            biggest = max(float(np.max(np.abs(s))) for s in step)
            if np.max(dec) < 1e-8:
                u = [a + s for a, s in zip(u, step)]
                eta = self._eta(eta0, M, u)
                if biggest < 1e-10:
                    break
                h = None
                continue
            if h is None:
                h = self._h(eta, u)
            t = np.ones(self.ncomp)
            for _ in range(40):
                u_new = [a + t[c][:, None] * s for a, s, c in zip(u, step, self.level_comp)]
                eta_new = self._eta(eta0, M, u_new)
                h_new = self._h(eta_new, u_new)
                worse = ~(h_new >= h - 1e-12 * (1.0 + np.abs(h)))      # a point outside the support: NaN
                if not worse.any():
                    break
                t = np.where(worse, 0.5 * t, t)
            u, eta, h = u_new, eta_new, h_new
            if biggest * float(np.max(t)) < 1e-10:
                break
        return u, eta

    def _newton_matrix(self, curv, M):
        """The factor of the modes' Newton matrix; for a family whose ℓ is not concave in η (Gamma, identity
        link), where the observed curvature is not positive definite, that of the rows with curvature > 0."""
        if self.family.log_concave:
            return self.pat.factor(self.pat.assemble(curv, M))
        try:
            return self.pat.factor(self.pat.assemble(curv, M))
        except np.linalg.LinAlgError:
            return self.pat.factor(self.pat.assemble(np.maximum(curv, 0.0), M))

    # --- value and gradient ---------------------------------------------------------------------
    def value_grad(self, phi: np.ndarray, u0=None, grad: bool = True, polish: bool = False, move_only: bool = False):
        """Log-likelihood, gradient and auxiliaries (modes û, dû/dφ, the factor of H) at φ = (β, θ) or
        (β, θ, ψ) (``polish``: see :meth:`_modes`)."""
        phi = np.asarray(phi, float)
        beta, theta = phi[: self.p], phi[self.p: self.p + self.ntheta]
        self.psi = phi[self.p + self.ntheta] if self.ndisp else None
        eta0 = self.X @ beta + self.off
        lams = self.lambdas(theta)
        M = [self.Z[:, c] @ lam for c, lam in zip(self.cols, lams)]
        if move_only:
            u = [np.asarray(x, float) for x in u0]
            eta = self._eta(eta0, M, u)
        else:
            u, eta = self._modes(eta0, M, self.u if u0 is None else u0, polish)
        fam, psi = self.family, self.psi
        w, w1, _ = fam.curvature(self.y, self.m, eta, self.curvature, psi)
        H = self.pat.factor(self.pat.assemble(w, M))
        hval = float(np.sum(fam.loglik(self.y, self.m, eta, psi))) - 0.5 * sum(float(np.sum(x * x)) for x in u)
        value = hval - 0.5 * H.logdet + self.const
        aux = {"u": u, "eta": eta, "lams": lams, "H": H}
        if not grad:
            return value, None, aux
        d1, d2, _, _ = fam.derivs(self.y, self.m, eta, psi)
        E = self._deta_fixed_u(u)
        C = [_rows(a, (d2[:, None, None] * Mf[:, :, None]) * E[:, None, :]) for a, Mf in zip(self.agg, M)]
        for t in range(self.ntheta):
            f, r = self.theta_f[t], self.theta_r[t]
            C[f][:, self.theta_lc[t], self.p + t] += self.agg[f] @ (d1 * self.Z[:, r])
        dp = fam.dispersion_derivs(self.y, self.m, eta, psi) if self.ndisp else None
        if dp is not None:                   # ∂(∇_u h)/∂ψ = Σ_j ∂²ℓ_j/∂η∂ψ m_j
            for Cf, a, Mf in zip(C, self.agg, M):
                Cf[:, :, -1] += _rows(a, Mf * dp.d1p[:, None])
        # observed curvature (and any canonical link): H is H_obs
        Hobs = H if (fam.canonical or self.curvature == "observed") else self.pat.factor(self.pat.assemble(-d2, M))
        dU = Hobs.solve(C)
        sel = H.selected_inverse()
        Y = sel.row_products(M)
        lev = sum(np.sum(Mf * Yf, axis=1) for Mf, Yf in zip(M, Y))
        # (w1·lev)ᵀ dη/dφ with dη/dφ = E + Σ_f M_f dU_f[codes]: the second part summed by level first
        wl = w1 * lev
        gr = E.T @ (d1 - 0.5 * wl) - 0.5 * sum(np.einsum("gc,gcp->p", _rows(a, Mf * wl[:, None]), d)
                                               for a, Mf, d in zip(self.agg, M, dU))
        for t in range(self.ntheta):
            f = self.theta_f[t]
            gr[self.p + t] -= np.sum(w * self.Z[:, self.theta_r[t]] * Y[f][:, self.theta_lc[t]])
        if dp is not None:                   # ∂h/∂ψ, and the weight's own ψ-derivative w_ψ = −ℓ_ηηψ
            gr[-1] += np.sum(dp.p1) + 0.5 * np.sum(dp.d2p * lev)
        aux["dU"], aux["sel"] = dU, sel
        return value, gr, aux

    def _deta_fixed_u(self, u) -> np.ndarray:
        """∂η/∂φ at fixed u: X for β, z_{f,j,r} u_f[c_f(j), c] for θ_t = Λ_f(r, c)."""
        E = np.zeros((self.n, self.p + self.ntheta + self.ndisp))
        E[:, : self.p] = self.X
        for t in range(self.ntheta):
            f = self.theta_f[t]
            E[:, self.p + t] = self.Z[:, self.theta_r[t]] * u[f][self.codes[f], self.theta_lc[t]]
        return E

    # --- the site's reply -----------------------------------------------------------------------
    def evaluate(self, phi: np.ndarray, hess: bool = True, step: float = 1e-5, central: bool = True,
                 polish: bool = False) -> Evaluation:
        """Value, analytic gradient and Hessian at φ: central (``central``) or forward differences of the
        analytic gradient (the moved modes polished too with ``polish``); NaN where the likelihood cannot be
        evaluated (the coordinator then steps shorter), as the single-factor engine."""
        phi = np.asarray(phi, float)
        u_prev = [x.copy() for x in self.u]
        for warm in (True, False):
            if not warm:
                if not any(np.any(x) for x in u_prev):
                    break
                self.u = [np.zeros_like(x) for x in u_prev]
            try:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    ev = self._evaluate(phi, hess, step, central, polish)
                ok = np.isfinite(ev.value) and np.all(np.isfinite(ev.grad)) and \
                    (ev.hess is None or np.all(np.isfinite(ev.hess)))
            except (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError, ValueError):
                ok = False
            if ok:
                return ev
        self.u = u_prev
        P = len(phi)
        return Evaluation(np.nan, np.full(P, np.nan), np.full((P, P), np.nan) if hess else None)

    def _evaluate(self, phi, hess, step, central, polish=False):
        value, gr, aux = self.value_grad(phi)
        u, dU = aux["u"], aux["dU"]
        self.u = u
        if not hess:
            return Evaluation(value, gr)
        P = len(phi)
        Hs = np.empty((P, P))
        dmodes = [np.empty((len(x), len(c), P)) for x, c in zip(u, self.cols)]
        dsds = [np.empty_like(d) for d in dmodes]
        up, down, hs = np.empty((P, P)), np.empty((P, P)), step * (1.0 + np.abs(phi))
        for t in range(P):
            h = hs[t]
            e = np.zeros(P)
            e[t] = h
            # central: the moved modes finished by a Newton step; forward: moved only (their O(h²) error
            # costs the gradient O(h²), the difference O(h): the order of a forward difference anyway)
            _, gp, ap = self.value_grad(phi + e, u0=[a + h * d[:, :, t] for a, d in zip(u, dU)],
                                        polish=True, move_only=not (central or polish))
            if central:
                _, gm, am = self.value_grad(phi - e, u0=[a - h * d[:, :, t] for a, d in zip(u, dU)], polish=True)
                Hs[:, t] = (gp - gm) / (2.0 * h)
                up[t], down[t] = gp, gm
                # the conditional modes and SDs there too: their central differences move them to the
                # coordinator's estimate (:meth:`mode_derivatives`)
                for f, (mp, sp, mm, sm) in enumerate(zip(*_modes_sds(ap), *_modes_sds(am))):
                    dmodes[f][:, :, t], dsds[f][:, :, t] = (mp - mm) / (2.0 * h), (sp - sm) / (2.0 * h)
            else:
                Hs[:, t] = (gp - gr) / h
        self._mode_fd = (phi.copy(), dmodes, dsds) if central else None
        if central:         # a final point's gradients, for its third derivatives (own_third._stencil_third)
            self.stencil = Stencil(phi.copy(), hs, np.asarray(gr, float).copy(), u, dU, up, down, {"polish": True})
        return Evaluation(value, gr, 0.5 * (Hs + Hs.T))

    def conditional_modes(self, phi: np.ndarray) -> tuple[dict, dict]:
        """Each factor's conditional modes b̂_f = Λ_f û_f and SDs sqrt(diag(Λ_f Σ_ff Λ_fᵀ)), by factor name."""
        _, _, aux = self.value_grad(phi, grad=False)
        aux["sel"] = aux["H"].selected_inverse()
        modes, sds = _modes_sds(aux)
        return dict(zip(self.names, modes)), dict(zip(self.names, sds))

    def mode_derivatives(self, phi: np.ndarray, beta=None, sigma=None) -> tuple[dict, dict]:
        """The derivatives in φ of each factor's conditional modes and SDs, (G_f, q_f, P) by factor name:
        central differences (step 1e-5 (1 + |φ_t|), error O(step²)) from the modes and SDs at the points of
        the central Hessian -- those of the last evaluation, when it was the final one at φ (the final
        round's), else evaluated again."""
        phi = np.asarray(phi, float)
        fd = getattr(self, "_mode_fd", None)
        if fd is None or not np.array_equal(fd[0], phi):
            self.evaluate(phi, hess=True, central=True)
            fd = getattr(self, "_mode_fd", None)
            if fd is None or not np.array_equal(fd[0], phi):
                raise np.linalg.LinAlgError("the conditional modes' derivatives could not be evaluated")
        return dict(zip(self.names, fd[1])), dict(zip(self.names, fd[2]))

    # --- the engine interface (see :mod:`fedglmm.likelihood.engine`) ----------------------------
    def sums(self, point: np.ndarray, final: bool = False) -> dict:
        """Value, gradient and Hessian: forward differences of the gradient while iterating, central ones
        at the estimate (``final``: the round whose Hessian gives the standard errors)."""
        ev = self.evaluate(point, hess=True, central=final)
        return {"value": ev.value, "grad": ev.grad, "hess": ev.hess}

    def modes(self, point: np.ndarray, beta=None, sigma=None) -> tuple[dict, dict]:
        return self.conditional_modes(point)

    def third_hessian(self, point: np.ndarray) -> np.ndarray:
        """ℓ's Hessian for third derivatives by its differences (:func:`fedglmm.site.own_third.reply_third`):
        forward differences of the analytic gradient with every moved mode polished -- an iteration's Hessian
        moves them only, an O(step) error that differences 1e-4 apart made a tenth of the third derivatives
        and more (a singular fit's standard errors then 4e-6 off)."""
        return self.evaluate(point, hess=True, central=False, polish=True).hess


def _modes_sds(aux: dict) -> tuple[list, list]:
    """Every factor's conditional modes Λ_f û_f and SDs sqrt(diag(Λ_f Σ_ff Λ_fᵀ)) from a
    :meth:`MultiLevelGLMM.value_grad`'s auxiliaries (with its selected inverse, ``sel``)."""
    modes, sds = [], []
    for lam, uf, S in zip(aux["lams"], aux["u"], aux["sel"].diagonal_blocks()):
        modes.append(uf @ lam.T)
        sds.append(np.sqrt(np.maximum(np.diagonal(lam @ S @ lam.T, axis1=1, axis2=2), 0.0)))
    return modes, sds


def _rows(agg, a: np.ndarray) -> np.ndarray:
    """Sums of the rows of ``a`` (n, ...) by the aggregator's index: (levels, ...)."""
    out = agg @ a.reshape(a.shape[0], -1)
    return np.asarray(out).reshape(agg.shape[0], *a.shape[1:])
