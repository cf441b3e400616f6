"""The derivatives in φ of each group's conditional modes b̂ = Λû and conditional SDs sqrt(diag(Λ H⁻¹ Λᵀ))
(:meth:`fedglmm.likelihood.laplace.GLMMLikelihood.conditional_modes`), with which the coordinator moves them
from the last point the sites evaluated to its estimate.
"""
from __future__ import annotations

import numpy as np



def mode_derivatives(engine, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The derivatives in φ = (β, θ, ψ) of a :class:`~fedglmm.likelihood.laplace.GLMMLikelihood`'s conditional
    modes and SDs, (G, q, P) each: db̂/dφ = Λ dû/dφ + (dΛ/dφ) û, and d sd from
    dC = dΛ H⁻¹Λᵀ + Λ H⁻¹ dΛᵀ − Λ H⁻¹ dH H⁻¹ Λᵀ, with dû/dφ and dH/dφ from the engine's implicit-function
    derivatives at φ (its modes start from the last evaluation's, at φ in the final round)."""
    aux = engine.value_grad(np.asarray(phi, float))[2]
    lam, u, Hinv = aux["lam"], aux["u"], aux["Hinv"]
    q, p, (r, c) = lam.shape[0], engine.p, (engine.theta_r, engine.theta_c)
    dlam = np.zeros((engine.nparams, q, q))                    # Λ does not depend on β or ψ
    dlam[p + np.arange(len(r)), r, c] = 1.0
    db = np.einsum("ab,gbp->gap", lam, aux["dU"]) + np.einsum("pab,gb->gap", dlam, u)
    A = lam @ Hinv                                                              # (G, q, q): Λ H⁻¹
    half = np.einsum("pab,gcb->gpac", dlam, A)                                  # dΛ H⁻¹ Λᵀ
    dcov = half + half.transpose(0, 1, 3, 2) - A[:, None] @ aux["dH"] @ A[:, None].transpose(0, 1, 3, 2)
    sd = np.sqrt(np.maximum(np.diagonal(A @ lam.T, axis1=1, axis2=2), 0.0))         # (G, q)
    dvar = np.diagonal(dcov, axis1=2, axis2=3).transpose(0, 2, 1)                # (G, q, P)
    return db, np.where(sd[:, :, None] > 0, dvar / (2.0 * np.where(sd > 0, sd, 1.0)[:, :, None]), 0.0)
