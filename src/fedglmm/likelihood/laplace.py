"""One site's contribution to the GLMM log-likelihood (Laplace or adaptive Gauss–Hermite), batched over groups.

Model and notation (see :mod:`fedglmm.model.spec`): for group i, η = Xβ + o + M u with M = ZΛ(θ), u ~ N(0, I_q), and

    h(u) = Σ_j ℓ_j(η_j, ψ) − ½ uᵀu,                 ℓ_j = log f(y_j | η_j, ψ) without its constant,
    H    = Mᵀ W M + I,                              W = curvature weights at the mode,
    ℓ_i  ≈ −½ log det H + log Σ_k w_k exp(h(û + S z_k) + ½‖z_k‖²),   S = R⁻¹, H = RᵀR (Cholesky),

W is −∂²ℓ/∂η² (``curvature="observed"``, the exact Laplace approximation, as glmmTMB computes it) or the
Fisher weight (``"expected"``, lme4's PIRLS weight); the two coincide for canonical links (logit, log).
(z_k, w_k) is the product Gauss–Hermite rule for N(0, I_q) (:mod:`fedglmm.likelihood.quadrature`).  One node at 0
gives the Laplace approximation ``h(û) − ½ log det H``, which is what lme4's ``glmer`` maximises with nAGQ=1;
for a scalar random effect the K-node rule is lme4's nAGQ=K.  For vector random effects the product grid
over the Cholesky-scaled directions is used (lme4 refuses nAGQ > 1 there).

The modes û are found by a Newton iteration run for all groups at once (stacked q×q solves, per-group step
halving).  The gradient is analytic: with dû/dφ from the implicit function theorem
(H_obs dû = ∂(∇_u h)/∂φ), dη̂/dφ = ∂η/∂φ + M dû/dφ, the derivative of H through W(η̂) and Λ(θ), and the
derivative of the Cholesky-scaled nodes dS = −S Φ(Sᵀ dH S) (Φ: upper triangle, halved diagonal).
For the Laplace approximation the Hessian is analytic as well (:meth:`GLMMLikelihood._laplace_hessian`); for
AGHQ it is the central difference of the analytic gradient, computed inside the site: local work, never a
round.  Everything is a sum over groups, so a site's numbers add up across sites.

Families with a dispersion parameter (negative binomial, Gamma; :mod:`fedglmm.model.dispersion`) add its
logarithm ψ as the last coordinate, φ = (β, θ, ψ).  ψ enters only through ℓ(η, ψ): ∂η/∂ψ = 0 at fixed u,
so dû/dψ solves H_obs dû = Σ_j ∂²ℓ_j/∂η∂ψ m_j, the curvature weight moves by w_η dη̂ + w_ψ, and the
Hessian gains the ψ rows below (each the generalisation of a term of the (β, θ) Hessian to a second row
variable).  Where a Gamma link bounds η, the modes start inside it (:mod:`fedglmm.likelihood.mode_start`).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..model.families import Family
from ..model.spec import Design, lambda_matrix, theta_index
from . import fused, restarts
from .conditional import curvature_derivative
from .linalg import chol as _chol, inv as _inv, solve as _solve, upper_half as _upper_half
from .mode_start import MODE_ITERATIONS, inside_domain
from .quadrature import gradient_hessian, product_grid


@dataclass
class Evaluation:
    """A site's reply to one evaluation: value, gradient and (optionally) Hessian of the log-likelihood."""

    value: float
    grad: np.ndarray
    hess: np.ndarray | None = None


class GLMMLikelihood:
    """Laplace / AGHQ log-likelihood of one site's rows, as a function of φ = (β, θ).

    ``X`` may be a transformed copy of ``design.X`` (the coordinator's internal scaling); everything else
    comes from the design.  The modes of the last evaluation are kept to warm-start the next one.
    """

    def __init__(self, design: Design, family: Family, nagq: int = 1, X: np.ndarray | None = None,
                 curvature: str = "observed"):
        if curvature not in ("observed", "expected"):
            raise ValueError("curvature must be 'observed' or 'expected'")
        self.family, self.curvature = family, curvature
        self.y = np.asarray(design.y, float)
        self.m = np.asarray(design.trials, float)
        self.off = np.asarray(design.offset, float)
        self.X = np.asarray(design.X if X is None else X, float)
        self.Z = np.asarray(design.Z, float)
        self.g = np.asarray(design.group)
        self.starts = design.starts
        self.n, self.p = self.X.shape
        self.q = self.Z.shape[1]
        self.G = len(self.starts) if self.q else 0
        self.theta_r, self.theta_c = theta_index(design.theta_mask)
        self.ntheta = len(self.theta_r)
        self.nagq = int(nagq)
        self.zk, lw = product_grid(self.nagq, self.q)
        self.ck = lw + 0.5 * np.sum(self.zk**2, axis=1)
        self._const = None          # Σ of the family's constant over the rows, on first use (:attr:`const`)
        self.ndisp = int(family.ndisp)
        self.psi = None                      # the dispersion parameter of the current evaluation
        self.u = np.zeros((self.G, self.q))
        self.unconverged = False    # the last search for the modes ended without them (_modes)
        self._eye = np.eye(self.q)
        self._last = None           # (φ, dû/dφ) of the last evaluation: the next one starts from û + dû·Δφ
        self._fused = self._hinv = None    # the fused kernel's view of the arrays, its H⁻¹ at the last point
        self.stencil = None         # by quadrature: the gradients of the last Hessian (quadrature.Stencil)

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def const(self) -> float:
        """Σ of the family's constant over the rows, on first use; or set (the hybrid's pseudo rows set 0: their
        binomial coefficients would load ``scipy.special`` into a small fit, and move no step)."""
        if self._const is None:
            self._const = self.family.constant(self.y, self.m)
        return self._const

    @const.setter
    def const(self, value: float) -> None:
        self._const = float(value)

    @property
    def nparams(self) -> int:
        return self.p + self.ntheta + self.ndisp

    def lam(self, theta: np.ndarray) -> np.ndarray:
        return lambda_matrix(theta, self.q, (self.theta_r, self.theta_c))

    def _gsum(self, a: np.ndarray) -> np.ndarray:
        return np.add.reduceat(a, self.starts, axis=0)

    def _h(self, eta: np.ndarray, u: np.ndarray) -> np.ndarray:
        return self._gsum(self.family.loglik(self.y, self.m, eta, self.psi)) - 0.5 * np.sum(u * u, axis=1)

    def _modes(self, eta0: np.ndarray, M: np.ndarray, MM: np.ndarray, u: np.ndarray, lam: np.ndarray):
        """Newton with per-group step halving for û = argmax h; returns (û, η at û)."""
        fam, g = self.family, self.g
        eta = eta0 + np.einsum("jc,jc->j", M, u[g])
        u, eta = inside_domain(self, eta0, M, lam, u, eta)        # (Gamma's bounded links)
        h = None                                   # h at u, computed only when a step must be checked
        self.unconverged = True                    # (until a step below 1e-10)
        for _ in range(MODE_ITERATIONS):
            d1, d2, _, _ = fam.derivs(self.y, self.m, eta, self.psi)
            grad = self._gsum(M * d1[:, None]) - u
            hobs = self._gsum(-d2[:, None, None] * MM) + self._eye
            if not fam.log_concave:
                hobs = self._definite(hobs, d2, MM)
            step = _solve(hobs, grad[..., None])[..., 0]
            t = np.ones(self.G)
            if np.max(np.sum(grad * step, axis=1)) < 1e-8:
                # Newton decrement tiny everywhere: h is concave and locally quadratic, the full step is safe
                u = u + step
                eta = eta0 + np.einsum("jc,jc->j", M, u[g])
                if np.max(np.abs(step)) < 1e-10:
                    self.unconverged = False
                    break
                h = None
                continue
            if h is None:
                h = self._h(eta, u)
            for _ in range(40):
                u_new = u + t[:, None] * step
                eta_new = eta0 + np.einsum("jc,jc->j", M, u_new[g])
                h_new = self._h(eta_new, u_new)
                worse = ~(h_new >= h - 1e-12 * (1.0 + np.abs(h)))      # a point outside the support: NaN
                if not worse.any():
                    break
                t = np.where(worse, 0.5 * t, t)
            u, eta, h = u_new, eta_new, h_new
            if np.max(np.abs(t[:, None] * step)) < 1e-10:
                self.unconverged = False
                break
        return u, eta

    def _definite(self, hobs, d2, MM):
        """The Newton matrix of the modes for a family whose ℓ is not concave in η (Gamma, identity link):
        the observed curvature where it is positive definite, else that of the rows with ∂²ℓ/∂η² < 0 only."""
        low = (hobs[:, 0, 0] if self.q == 1 else np.linalg.eigvalsh(hobs)[:, 0]) <= 0
        if not low.any():
            return hobs
        clipped = self._gsum(np.maximum(-d2, 0.0)[:, None, None] * MM) + self._eye
        return np.where(low[:, None, None], clipped, hobs)

    # --- value and gradient -------------------------------------------------------------------------
    def value_grad(self, phi: np.ndarray, u0: np.ndarray | None = None, grad: bool = True, hess: bool = False):
        """Log-likelihood, gradient and auxiliaries (modes û and dû/dφ) at φ = (β, θ) or (β, θ, ψ).

        With ``hess`` (Laplace only) the analytic Hessian is returned in ``aux["hess"]``.
        """
        phi = np.asarray(phi, float)
        beta, theta = phi[: self.p], phi[self.p: self.p + self.ntheta]
        self.psi = phi[self.p + self.ntheta] if self.ndisp else None
        eta0 = self.X @ beta + self.off
        if self.q == 0:
            return self._glm(eta0, grad)
        s = self._at_mode(eta0, theta, self.u if u0 is None else u0)
        aux = {"u": s.u, "eta": s.eta, "lam": s.lam, "H": s.H, "L": s.L}
        if not grad:
            return s.value, None, aux
        self._mode_derivatives(s)
        gr = self._gradient(s)
        aux.update(dU=s.dU, dH=s.dH, Hinv=s.Hinv)         # dH, Hinv: the modes' derivatives (conditional.py)
        if hess and s.laplace:
            aux["hess"] = self._laplace_hessian(s.u, s.eta, s.M, s.d2, s.w, s.w1, s.w2, s.hobs, s.C, s.dU, s.deta,
                                                s.dH, s.Hinv, s.dp)
        return s.value, gr, aux

    def _at_mode(self, eta0: np.ndarray, theta: np.ndarray, u0: np.ndarray) -> SimpleNamespace:
        """The modes at (β, θ), the curvature there, and the Laplace / AGHQ value."""
        fam, g = self.family, self.g
        lam = self.lam(theta)
        M = self.Z @ lam
        MM = M[:, :, None] * M[:, None, :]
        u, eta = self._modes(eta0, M, MM, u0, lam)
        psi = self.psi
        d1, d2, _, _ = fam.derivs(self.y, self.m, eta, psi)
        w, w1, w2 = fam.curvature(self.y, self.m, eta, self.curvature, psi)
        H = self._gsum(w[:, None, None] * MM) + self._eye
        L = _chol(H)
        logdet = 2.0 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)
        s = SimpleNamespace(lam=lam, M=M, MM=MM, u=u, eta=eta, d1=d1, d2=d2, w=w, w1=w1, w2=w2, H=H, L=L,
                            laplace=len(self.ck) == 1,
                            dp=fam.dispersion_derivs(self.y, self.m, eta, psi) if self.ndisp else None)
        if s.laplace:
            value = np.sum(self._h(eta, u) - 0.5 * logdet)
        else:
            S = _inv(L).transpose(0, 2, 1)               # R⁻¹ with H = RᵀR
            V = S @ self.zk.T                                      # (G, q, K) node offsets
            etak = eta[:, None] + np.einsum("jc,jck->jk", M, V[g])
            uk = u[:, None, :] + V.transpose(0, 2, 1)              # (G, K, q)
            a = self.ck + self._gsum(fam.loglik(self.y[:, None], self.m[:, None], etak, psi)) \
                - 0.5 * np.sum(uk * uk, axis=2)
            amax = a.max(axis=1, keepdims=True)
            ea = np.exp(a - amax)
            se = ea.sum(axis=1, keepdims=True)
            value = np.sum(amax[:, 0] + np.log(se[:, 0]) - 0.5 * logdet)
            s.S, s.V, s.etak, s.uk, s.ea, s.se = S, V, etak, uk, ea, se
        s.value = value + self.const
        return s

    def _mode_derivatives(self, s: SimpleNamespace) -> None:
        """dû/dφ from H_obs dû = ∂(∇_u h)/∂φ, the total derivative of η at the mode, and that of H."""
        g, r, c = self.g, self.theta_r, self.theta_c
        M, MM, u, d1, d2, w, w1 = s.M, s.MM, s.u, s.d1, s.d2, s.w, s.w1
        hobs = self._gsum(-d2[:, None, None] * MM) + self._eye
        cb = self._gsum(d2[:, None, None] * M[:, :, None] * self.X[:, None, :])        # (G, q, p)
        ztd1 = self._gsum(self.Z * d1[:, None])                                        # (G, q)
        md2z = self._gsum(d2[:, None, None] * M[:, :, None] * self.Z[:, None, :])      # (G, q, q)
        ct = md2z[:, :, r] * u[:, None, c]                                               # (G, q, nθ)
        ct[:, c, np.arange(self.ntheta)] += ztd1[:, r]
        blocks, E = [cb, ct], [self.X, self.Z[:, r] * u[g][:, c]]
        if self.ndisp:                            # ψ: ∂(∇_u h)/∂ψ = Σ ∂²ℓ/∂η∂ψ m; ∂η/∂ψ = 0 at fixed u
            blocks.append(self._gsum(M * s.dp.d1p[:, None])[:, :, None])
            E.append(np.zeros((self.n, 1)))
        C = np.concatenate(blocks, axis=2)
        dU = _solve(hobs, C)                                                   # (G, q, P)
        # total derivative of η at the mode, and of H
        deta = np.concatenate(E, axis=1) + np.einsum("jc,jcp->jp", M, dU[g])
        dH, dw = curvature_derivative(self, M, MM, w, w1, deta, s.dp)
        s.hobs, s.dU, s.deta, s.dH, s.Hinv, s.C, s.dw = hobs, dU, deta, dH, _inv(s.H), C, dw

    def _gradient(self, s: SimpleNamespace) -> np.ndarray:
        """The analytic gradient from the mode derivatives (and, for AGHQ, the nodes' posterior weights)."""
        fam, g, r, c = self.family, self.g, self.theta_r, self.theta_c
        u, dU, dH = s.u, s.dU, s.dH
        gr = -0.5 * np.einsum("gab,gpab->p", s.Hinv, dH)
        if s.laplace:
            d1bar = s.d1
            T = s.d1[:, None] * u[g]
        else:
            S, V, ea, se = s.S, s.V, s.ea, s.se
            pi = ea / se                                             # (G, K) node posterior weights
            D1k = fam.derivs(self.y[:, None], self.m[:, None], s.etak, self.psi)[0]
            PD = pi[g] * D1k
            d1bar = PD.sum(axis=1)
            T = d1bar[:, None] * u[g] + np.einsum("jk,jck->jc", PD, V[g])
            gk = self._gsum(D1k[:, :, None] * s.M[:, None, :]) - s.uk                  # ∇_u h at nodes
            gbar = np.einsum("gk,gkc->gc", pi, gk)
            gam = np.einsum("gk,kq,gkc->gqc", pi, self.zk, gk)
            dS = -S[:, None] @ _upper_half(S.transpose(0, 2, 1)[:, None] @ dH @ S[:, None])
            gr += np.einsum("gc,gcp->p", gbar, dU) + np.einsum("gpab,gba->p", dS, gam)
        gr[: self.p] += self.X.T @ d1bar
        gr[self.p: self.p + self.ntheta] += np.sum(self.Z[:, r] * T[:, c], axis=0)
        if self.ndisp:                            # ∂h/∂ψ at the mode, or its posterior mean over the nodes
            gr[-1] += np.sum(s.dp.p1) if s.laplace else \
                np.sum(pi[g] * fam.dispersion_derivs(self.y[:, None], self.m[:, None], s.etak, self.psi).p1)
        return gr

    def _laplace_hessian(self, u, eta, M, d2, w, w1, w2, hobs, C, dU, deta, dH, Hinv, dp=None):
        """Analytic Hessian of Σ_i [h(û) − ½ log det H] (see the module docstring for the pieces).

        Hessian = h_φφ + Cᵀ dU (the profiled h) − ½ tr(H⁻¹ D²H) + ½ tr(H⁻¹ DH H⁻¹ DH).  The second
        derivatives of the modes enter tr(H⁻¹ D²H) only through a_gᵀ d²û with a_g = Σ_j w′_j lev_j m_j,
        so they are never formed: with v_g = H_obs⁻¹ a_g every term is a row-weighted cross-product.

        A dispersion ψ (``dp``, the ψ-derivatives) is a second row variable beside η: wherever a (β, θ)
        term has f′(η̂) dη̂_s, the ψ row has f_η dη̂_ψ + f_ψ, and f″ dη̂_s dη̂_t becomes
        f_ηη dη̂_s dη̂_t + f_ηψ (dη̂_s δ_tψ + δ_sψ dη̂_t) + f_ψψ δ_sψ δ_tψ (f: ℓ_η for the modes, w for H).
        """
        p, k, g, Z = self.p, self.ntheta, self.g, self.Z
        r, c = self.theta_r, self.theta_c
        nd = self.ndisp
        P = p + k + nd
        d3 = self.family.derivs2(self.y, self.m, eta, self.psi)[0]
        E = np.concatenate([self.X, Z[:, r] * u[g][:, c]] + ([np.zeros((self.n, 1))] if nd else []), axis=1)
        hs = (E * d2[:, None]).T @ E + np.einsum("gqs,gqt->st", C, dU)
        if nd:                               # h_φψ at fixed u: Σ ℓ_ηψ ∂η/∂φ, and h_ψψ
            a = E.T @ dp.d1p
            hs[:, -1] += a
            hs[-1, :] += a
            hs[-1, -1] += np.sum(dp.pp)
        HinvM = np.einsum("jab,jb->ja", Hinv[g], M)
        lev = np.sum(M * HinvM, axis=1)

        def cross(weight):
            return (deta * weight[:, None]).T @ deta

        def q_term(bg):                      # Σ_j ω_j Q_jst with Σ_{j∈g} ω_j z_j = bg
            K = np.zeros((P, P))
            K[:, p: p + k] = np.einsum("gt,gts->st", bg[:, r], dU[:, c, :]) if k else 0.0
            return K + K.T

        v = _solve(hobs, self._gsum(M * (w1 * lev)[:, None])[..., None])[..., 0]
        vm = np.einsum("jc,jc->j", M, v[g])
        S = cross(w2 * lev + d3 * vm)
        if nd:                               # w_ηψ = −ℓ_ηηηψ, w_ψψ = −ℓ_ηηψψ; ℓ_ηηψ and ℓ_ηψψ for the modes
            b = deta.T @ (-dp.d3p * lev + dp.d2p * vm)
            S[:, -1] += b
            S[-1, :] += b
            S[-1, -1] += np.sum(-dp.d2pp * lev + dp.d1pp * vm)
        S += q_term(self._gsum(Z * (w1 * lev)[:, None])) + q_term(self._gsum(Z * (d2 * vm)[:, None]))
        if k:
            F = self._gsum((Z * d2[:, None])[:, :, None] * deta[:, None, :])        # (G, q, P)
            if nd:                           # the total derivative of ℓ_η along ψ has ℓ_ηψ besides ℓ_ηη dη̂_ψ
                F[:, :, -1] += self._gsum(Z * dp.d1p[:, None])
            K = np.zeros((P, P))
            K[p: p + k, :] = np.einsum("gs,gst->st", v[:, c], F[:, r, :])
            K[p: p + k, :] += 2.0 * (w1[:, None] * HinvM[:, c] * Z[:, r]).T @ deta
            if nd:                           # and that of w has w_ψ = −ℓ_ηηψ besides w_η dη̂_ψ
                K[p: p + k, -1] -= 2.0 * (HinvM[:, c] * Z[:, r]).T @ dp.d2p
            S += K + K.T
            Wzz = self._gsum((Z * w[:, None])[:, :, None] * Z[:, None, :])
            S[p: p + k, p: p + k] += 2.0 * np.einsum("gts,gts->ts", Wzz[:, r][:, :, r], Hinv[:, c][:, :, c])
        HdH = Hinv[:, None] @ dH
        hs += -0.5 * S + 0.5 * np.einsum("gsab,gtba->st", HdH, HdH)
        return 0.5 * (hs + hs.T)

    def _glm(self, eta, grad):
        fam, psi = self.family, self.psi
        value = float(np.sum(fam.loglik(self.y, self.m, eta, psi))) + self.const
        if not grad:
            return value, None, {}
        d1, d2, _, _ = fam.derivs(self.y, self.m, eta, psi)
        gr, hess = self.X.T @ d1, (self.X * d2[:, None]).T @ self.X
        if self.ndisp:
            dp = fam.dispersion_derivs(self.y, self.m, eta, psi)
            a = self.X.T @ dp.d1p
            gr, hess = np.r_[gr, np.sum(dp.p1)], np.block([[hess, a[:, None]], [a[None, :], np.sum(dp.pp)]])
        return value, gr, {"hess": hess}

    # --- the site's reply ---------------------------------------------------------------------------
    def evaluate(self, phi: np.ndarray, hess: bool = True, step: float = 1e-5) -> Evaluation:
        """Value, gradient and Hessian at φ: analytic for Laplace; for AGHQ the Hessian is the central
        difference of the analytic gradient (local work only).

        A point where the likelihood cannot be evaluated (the means overflow, a mode's curvature is not
        finite) gives a value, gradient and Hessian of NaN: the coordinator's optimiser then rejects the
        point and steps shorter, and the next evaluation starts from the last good modes (where the
        modes start: :mod:`fedglmm.likelihood.restarts`)."""
        phi = np.asarray(phi, float)
        ev = restarts.evaluate(self, phi, lambda: self._evaluate(phi, hess, step))
        if ev is not None:
            return ev
        P = len(phi)
        return Evaluation(np.nan, np.full(P, np.nan), np.full((P, P), np.nan) if hess else None)

    def _evaluate(self, phi: np.ndarray, hess: bool, step: float) -> Evaluation:
        if fused.usable(self):
            return Evaluation(*fused.evaluate(self, phi, hess))
        laplace = len(self.ck) == 1
        value, gr, aux = self.value_grad(phi, hess=hess and laplace)
        if self.q and self.unconverged:          # (MODE_ITERATIONS: a start too far off for Newton)
            raise FloatingPointError("the conditional modes were not found")
        if self.q:
            self._last = (phi.copy(), aux["dU"])
        if self.q == 0 or (hess and laplace):
            self.u = aux.get("u", self.u)
            return Evaluation(value, gr, aux["hess"] if hess else None)
        u, dU = aux["u"], aux["dU"]
        self.u = u
        if not hess:
            return Evaluation(value, gr)
        return Evaluation(value, gr, gradient_hessian(self, phi, gr, u, dU, step))

    def conditional_modes(self, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Conditional modes b̂ = Λû and conditional SDs sqrt(diag(Λ H⁻¹ Λᵀ)) of each group's effects."""
        phi = np.asarray(phi, float)
        lam = self.lam(phi[self.p:self.p + self.ntheta])
        got = fused.modes(self, phi, lam) if fused.usable(self) else None
        if got is None:
            _, _, aux = self.value_grad(phi, grad=False)
            got = aux["u"], _inv(aux["H"])
        cov = lam @ got[1] @ lam.T
        return got[0] @ lam.T, np.sqrt(np.maximum(np.diagonal(cov, axis1=1, axis2=2), 0.0))

    # --- the engine interface (see :mod:`fedglmm.likelihood.engine`) ------------------------------
    def sums(self, point: np.ndarray, final: bool = False) -> dict:
        """Value, gradient and Hessian at φ as the site sends them."""
        ev = self.evaluate(point, hess=True)
        return {"value": ev.value, "grad": ev.grad, "hess": ev.hess}

    def modes(self, point: np.ndarray, beta=None, sigma=None) -> tuple[np.ndarray, np.ndarray]:
        """Each group's conditional modes and conditional SDs at φ (``beta``, ``sigma``: unused)."""
        return self.conditional_modes(point)

