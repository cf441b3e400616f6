"""Gauss–Hermite rules for the standard normal density, and their product grids.

A rule (z_k, w_k) integrates ∫ f(z) φ(z) dz ≈ Σ_k w_k f(z_k) with Σ_k w_k = 1, exactly for polynomials of
degree ≤ 2K − 1 (the rule lme4's ``GHrule`` also uses).  For q random effects per group the product grid
has K^q nodes; one node at 0 with weight 1 (K = 1) makes adaptive quadrature the Laplace approximation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from numpy.polynomial.hermite_e import hermegauss


@lru_cache(maxsize=64)
def gh_rule(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and log-weights of the K-point rule for N(0, 1)."""
    if k < 1:
        raise ValueError("the number of quadrature nodes must be at least 1")
    if k == 1:
        return np.zeros(1), np.zeros(1)
    z, w = hermegauss(k)
    return z, np.log(w) - 0.5 * np.log(2.0 * np.pi)


@lru_cache(maxsize=64)
def product_grid(k: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (K^q × q) and log-weights (K^q) of the product rule for N(0, I_q)."""
    z, lw = gh_rule(k)
    if q == 0:
        return np.zeros((1, 0)), np.zeros(1)
    grids = np.meshgrid(*([np.arange(k)] * q), indexing="ij")
    idx = np.stack([g.ravel() for g in grids], axis=1)
    return z[idx], lw[idx].sum(axis=1)


@dataclass
class Stencil:
    """The analytic gradients an adaptive Gauss-Hermite Hessian was differenced from (:func:`gradient_hessian`; or a
    multi-level engine's central one, whose ``u`` and ``dU`` are one per factor):
    at φ (``g0``, with the modes ``u`` and their derivatives ``dU`` there) and at φ ± h_t e_t (rows ``up``,
    ``down``); kept on the engine for F's third derivatives at the same point (:mod:`fedglmm.site.own_third`)."""

    phi: np.ndarray
    h: np.ndarray
    g0: np.ndarray
    u: np.ndarray
    dU: np.ndarray
    up: np.ndarray
    down: np.ndarray
    kw: dict = field(default_factory=dict)      # the engine's ``value_grad``'s further arguments (polish)

    def grad(self, lik, d: np.ndarray) -> np.ndarray:
        """The analytic gradient at φ + d, the modes started from û + dû/dφ·d (an array, or one per factor)."""
        u0 = [a + D @ d for a, D in zip(self.u, self.dU)] if isinstance(self.u, list) else self.u + self.dU @ d
        return np.asarray(lik.value_grad(self.phi + d, u0=u0, **self.kw)[1], float)


def gradient_hessian(lik, phi: np.ndarray, g0: np.ndarray, u: np.ndarray, dU: np.ndarray, step: float) -> np.ndarray:
    """The Hessian at φ by adaptive Gauss-Hermite quadrature: the central difference of the analytic gradient
    h_t = step·(1 + |φ_t|) either side in each coordinate (2P gradients, the modes started from û ± h_t·dû/dφ_t);
    its gradients are kept on ``lik`` (``stencil``)."""
    P = len(phi)
    h = step * (1.0 + np.abs(phi))
    up, down = np.empty((P, P)), np.empty((P, P))
    for t in range(P):
        e = np.zeros(P)
        e[t] = h[t]
        up[t] = lik.value_grad(phi + e, u0=u + h[t] * dU[:, :, t])[1]
        down[t] = lik.value_grad(phi - e, u0=u - h[t] * dU[:, :, t])[1]
    lik.stencil = Stencil(phi.copy(), h, np.asarray(g0, float).copy(), u, dU, up, down)
    H = ((up - down) / (2.0 * h[:, None])).T
    return 0.5 * (H + H.T)
