"""The coordinator's side of a GLMM with shared levels: the Laplace log-likelihood in φ = (β, θ) and its
gradient from the sites' summed sums at one point (v, φ), and where v goes next.

Notation and the sites' sums: :mod:`fedglmm.likelihood.glmm_shared`.  With x = (v, φ), ψ(x) = (Λ_v v, β, θ)
(so ∂b/∂v = Λ, ∂b/∂θ_t = Λ_t v with Λ_t = ∂Λ_v/∂θ_t; b is bilinear in (θ, v)), the sums give

    F(x) = Σ_s h*_s(ψ) − ½‖v‖²,   D(x) = Σ_s log det H_s + log det C,   C = I + Λᵀ S Λ = −F_vv,

and ℓ(φ) = F − ½D at the joint mode v̂(φ) (F_v = 0).  The mode's Newton step is δv = C⁻¹F_v, its tangent
τ = dv̂/dφ = C⁻¹F_vφ (implicit function), and, to first order in δv,

    ℓ(φ) ≈ F + ½ F_v·δv − ½ (D + D_v·δv),      ∂ℓ/∂φ ≈ F_φ + τᵀF_v − ½ (D_φ + τᵀ D_v).

The gradient's D part is here taken at v, not at the mode: it is off by O(δv) -- D_φ and D_v move with
v, and so does the tangent τ.  The rounds move it to the mode from their difference points
(:func:`fedglmm.coordinator.shared_ends.log_det_to_mode`, with ``Dv`` and ``C`` of each point).

The derivatives of log det C need those of S: ∂ log det C/∂ψ = ⟨Γ, ∂S/∂ψ⟩ (Γ = Λ C⁻¹ Λᵀ) plus the
explicit 2 tr(C⁻¹ Λᵀ S Λ_t) of θ.  Γ depends on the point's own total S, which the sites cannot know
when they compute: they contract ∂S_s with the coordinator's prediction Γ̂ (``gc``).  Where the round
also evaluated the points x ± h (τ̄_j, e_j) (τ̄: the predicted tangent; :mod:`fedglmm.coordinator.shared_glmm_rounds`),
the coordinator has ∂S along those directions from their totals and contracts it with the exact Γ: only
the part along τ − τ̄ uses Γ̂, an error of the order of the product of two differences between
consecutive iterates.  The value and gradient are then exact at the joint mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shared import SharedLambda


@dataclass
class SharedPoint:
    """The profile at one evaluated point: value, gradient in φ, and the shared effects' state there."""

    phi: np.ndarray
    v: np.ndarray
    value: float
    grad: np.ndarray
    dv: np.ndarray          # Newton step of v towards the joint mode
    tau: np.ndarray         # dv̂/dφ (Q × P)
    S: np.ndarray           # Σ_s S_s
    Cinv: np.ndarray        # C⁻¹: Var(v | y) at the mode
    Gamma: np.ndarray       # Λ C⁻¹ Λᵀ
    F: float = np.nan       # Σ h* − ½‖v‖² at v: the objective v maximises
    dtau: np.ndarray | None = None  # ∂τ along (τ̄_j, e_j) (P × Q × P), when the round had the points for it
    dS: np.ndarray | None = None    # ∂S along (τ̄_j, e_j), when the round had the points for it
    Dv: np.ndarray | None = None    # ∂D/∂v at (v, φ)
    C: np.ndarray | None = None     # C = I + Λᵀ S Λ
    ldc_v: np.ndarray | None = None     # ∂ log det C/∂v through S, contracted with the Γ̂ sent

    @property
    def decrement(self) -> float:
        """v's Newton decrement F_v·δv = δvᵀCδv."""
        return float(self.dv @ np.linalg.solve(self.Cinv, self.dv))

    def v_at(self, phi) -> np.ndarray:
        """Where v goes for a trial φ: the mode's Newton step plus its tangent (and its curvature, where
        ∂τ is known)."""
        d = np.asarray(phi, float) - self.phi
        out = self.v + self.dv + self.tau @ d
        if self.dtau is not None:
            out = out + 0.5 * np.einsum("j,jqk,k->q", d, self.dtau, d)
        return out

    def tau_at(self, phi) -> np.ndarray:
        """The tangent dv̂/dφ predicted at φ (to first order where ∂τ is known)."""
        if self.dtau is None:
            return self.tau
        return self.tau + np.tensordot(np.asarray(phi, float) - self.phi, self.dtau, 1)

    def S_at(self, phi) -> np.ndarray:
        """S predicted at φ (to first order where ∂S is known)."""
        if self.dS is None:
            return self.S
        return self.S + np.tensordot(np.asarray(phi, float) - self.phi, self.dS, 1)


class SharedGLMMPool(SharedLambda):
    """The coordinator's algebra over the summed sums (global layout: v's Q columns, then β, θ)."""

    def psi(self, phi, v) -> np.ndarray:
        """The global point the sites evaluate: (b = Λ v, β, θ)."""
        phi = np.asarray(phi, float)
        return np.r_[self.L(phi[self.p:]) @ np.asarray(v, float), phi]

    def gamma(self, phi, S) -> np.ndarray:
        """Γ = Λ C⁻¹ Λᵀ for a total S (a prediction: its symmetric part, floored at positive semi-definite)."""
        L = self.L(np.asarray(phi, float)[self.p:])
        S = 0.5 * (S + S.T)
        ev, vec = np.linalg.eigh(S) if S.size else (np.zeros(0), S)
        S = (vec * np.maximum(ev, 0.0)) @ vec.T
        C = np.eye(self.Q) + L.T @ S @ L
        return L @ np.linalg.solve(C, L.T)

    def assess(self, tot: dict, phi, v, fd: tuple | None = None, near: tuple | None = None) -> SharedPoint:
        """The profile at (v, φ) from the summed sums ``tot`` (``gc`` contracted with the Γ̂ sent).
        ``fd`` = (S₊, S₋, h, τ̄): the totals S at x ± h_j (τ̄_j, e_j) for each j, for the exact ∂S;
        ``near`` = (Γ̂, ∂S): a point close to one with ``fd``, whose ∂S along (τ̄_j, e_j) corrects the part
        of the gradient that used Γ̂ (to first order in Γ − Γ̂: the derivatives of log det C are
        ⟨Γ, ∂S⟩)."""
        phi, v = np.asarray(phi, float), np.asarray(v, float)
        Q, p, k = self.Q, self.p, self.k
        theta = phi[p:]
        L = self.L(theta)
        gh, Hh = np.asarray(tot["gh"], float), np.asarray(tot["Hh"], float)
        gl, gc = np.asarray(tot["gl"], float), np.asarray(tot["gc"], float)
        gb, Hbb, Hbf = gh[:Q], Hh[:Q, :Q], Hh[:Q, Q:]
        dLv = [dl @ v for dl in self.dL]
        F = float(tot["h"]) - 0.5 * float(v @ v)
        Fv = L.T @ gb - v
        Fphi = gh[Q:].copy()
        Fvphi = L.T @ Hbf
        for t in range(k):
            Fphi[p + t] += dLv[t] @ gb
            Fvphi[:, p + t] += L.T @ (Hbb @ dLv[t]) + self.dL[t].T @ gb
        S = -0.5 * (Hbb + Hbb.T)
        C = np.eye(Q) + L.T @ S @ L
        from scipy.linalg import cho_factor, cho_solve      # on first use: a fit without shared levels needs none

        cf = cho_factor(C, lower=True)
        Cinv = cho_solve(cf, np.eye(Q))
        dv, tau = Cinv @ Fv, Cinv @ Fvphi
        Gamma = L @ Cinv @ L.T
        SLC = S @ L @ Cinv
        # ∂ log det C at fixed S (θ only), and through S with Γ̂ (the sites' gc)
        explicit = np.r_[np.zeros(p), [2.0 * float(np.sum(SLC * dl)) for dl in self.dL]]
        ldc_v = L.T @ gc[:Q]
        ldc_phi = gc[Q:] + explicit
        for t in range(k):
            ldc_phi[p + t] += dLv[t] @ gc[:Q]
        Dv = L.T @ gl[:Q] + ldc_v
        Dphi = gl[Q:].copy()
        for t in range(k):
            Dphi[p + t] += dLv[t] @ gl[:Q]
        Dphi += ldc_phi
        D = float(tot["l"]) + 2.0 * float(np.sum(np.log(np.diag(cf[0]))))
        value = F + 0.5 * Fv @ dv - 0.5 * (D + Dv @ dv)
        Dtot = Dphi + tau.T @ Dv                         # D along the tangent (v, φ) ← (τ_j, e_j)
        dS = None
        if fd is not None:
            Sp, Sm, h, taubar = fd
            dS = np.stack([(0.5 * (a + a.T) - 0.5 * (b + b.T)) / (2.0 * hj) for a, b, hj in zip(Sp, Sm, h)])
            exact = explicit + np.einsum("qr,jqr->j", Gamma, dS)       # log det C along (τ̄_j, e_j), exact Γ
            Dtot = Dtot - (ldc_phi + taubar.T @ ldc_v) + exact
        elif near is not None:
            Dtot = Dtot + np.einsum("qr,jqr->j", Gamma - near[0], near[1])
        grad = Fphi + tau.T @ Fv - 0.5 * Dtot
        return SharedPoint(phi, v, value, grad, dv, tau, S, Cinv, Gamma, F=F, dS=dS, Dv=Dv, C=C, ldc_v=ldc_v)
