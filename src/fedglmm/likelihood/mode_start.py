"""Where a group's conditional mode starts under a link that bounds η (Gamma, inverse and identity: η > 0).

Newton's steps for the modes (:meth:`~fedglmm.likelihood.laplace.GLMMLikelihood._modes`) from a point where
h is not finite have no direction, and their step halving never gets back inside.  A group whose start
has η ≤ 0 at a row -- the last point's modes, or zero where the fixed part alone is outside -- therefore
starts where its lowest row sits at half the median η of the rows inside (one random intercept per group;
other designs start as before).  Without it the evaluation at a point depended on the path to it: a draw of
``benchmarks/shape_sweep.py`` fitted over 30 sites met points whose every neighbour down to 1e-5 came back
not finite, and ran to its 60th round (now 9)."""
from __future__ import annotations

import numpy as np


def inside_domain(lik, eta0: np.ndarray, M: np.ndarray, u: np.ndarray, eta: np.ndarray):
    """(u, η) of ``lik`` (a :class:`~fedglmm.likelihood.laplace.GLMMLikelihood`) with every group's lowest
    row inside the domain, where it has one random intercept per group; else as given."""
    if not lik.family.positive_eta or lik.q != 1 or not _intercept_only(lik):
        return u, eta
    low = np.minimum.reduceat(eta, lik.starts)
    m = M[lik.starts, 0]                        # (constant within a group: Z's one column is)
    out = (low <= 0) & (np.abs(m) > 0)
    if not out.any() or not np.any(eta > 0):
        return u, eta
    target = 0.5 * float(np.median(eta[eta > 0]))
    u = u.copy()
    u[out, 0] += (target - low[out]) / m[out]
    return u, eta0 + np.einsum("jc,jc->j", M, u[lik.g])


def _intercept_only(lik) -> bool:
    """Whether the one Z column is constant (a random intercept), remembered on the engine."""
    if not hasattr(lik, "_z_constant"):
        lik._z_constant = bool(len(lik.Z)) and bool(np.all(lik.Z[:, 0] == lik.Z[0, 0]))
    return lik._z_constant
