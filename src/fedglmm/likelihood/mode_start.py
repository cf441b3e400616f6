"""Where a group's conditional mode starts under a link that bounds η (Gamma, inverse and identity: η > 0), and
how many Newton steps its search may take (MODE_ITERATIONS).

Newton's steps for the modes (:meth:`~fedglmm.likelihood.laplace.GLMMLikelihood._modes`) from a point where
h is not finite have no direction, and their step halving never gets back inside.  A group whose start
has η ≤ 0 at a row -- the last point's modes, or zero where the fixed part alone is outside -- therefore
starts where its lowest row sits at half the median η of the rows inside: its random intercept moved, which
moves every row of the group alike (random slopes beside it kept; without a random intercept the modes
start as before).  Without it the evaluation at a point depended on the path to it: a draw of
``benchmarks/shape_sweep.py`` fitted over 30 sites met points whose every neighbour down to 1e-5 came back
not finite, and ran to its 60th round (now 9)."""
from __future__ import annotations

import numpy as np

# a group's mode not found in this many Newton steps fails the evaluation (likelihood.restarts then starts the
# modes elsewhere): from the modes of a point of SD 0.016, u = b/0.016, a poisson group at SD 1.2 started at
# η ≈ 380, and Newton, falling by about 1 a step from so far above, ended its 100 steps at −ℓ ≈ 1e163 -- a finite
# value taken for the point's (the hybrid's first round: 13 rounds where the start was within 0.2 of the optimum)
MODE_ITERATIONS = 100


def inside_domain(lik, eta0: np.ndarray, M: np.ndarray, lam: np.ndarray, u: np.ndarray, eta: np.ndarray):
    """(u, η) of ``lik`` (a :class:`~fedglmm.likelihood.laplace.GLMMLikelihood`, M = ZΛ, ``lam`` = Λ) with every
    group's lowest row inside the domain, where its random effects have an intercept; else as given."""
    if not lik.family.positive_eta:
        return u, eta
    col = _intercept_column(lik)
    low = np.minimum.reduceat(eta, lik.starts) if col is not None else None
    if low is None or not np.any(low <= 0) or not np.any(eta > 0):
        return u, eta
    shift = _uniform_shift(lam, M, col, float(lik.Z[0, col]))
    if shift is None:
        return u, eta
    out = low <= 0
    target = 0.5 * float(np.median(eta[eta > 0]))
    u = u.copy()
    u[out] += (target - low[out])[:, None] * shift[None, :]
    return u, eta0 + np.einsum("jc,jc->j", M, u[lik.g])


def _uniform_shift(lam: np.ndarray, M: np.ndarray, col: int, z: float) -> np.ndarray | None:
    """The change of u that moves η by 1 at every row: b = Λu's intercept entry by 1/z (Z's constant column
    ``col`` is z), u by Λ⁻¹ e_col / z.  None where Λ cannot move it (the intercept's SD at 0)."""
    e = np.zeros(lam.shape[0])
    e[col] = 1.0 / z
    try:
        shift = np.linalg.solve(lam, e)
    except np.linalg.LinAlgError:
        return None
    moved = M @ shift
    return shift if np.all(np.isfinite(shift)) and np.allclose(moved, 1.0, rtol=0.0, atol=1e-8) else None


def _intercept_column(lik) -> int | None:
    """The column of Z that is constant (a random intercept), or None; remembered on the engine."""
    if not hasattr(lik, "_z_intercept"):
        const = np.flatnonzero(np.all(lik.Z == lik.Z[:1], axis=0) & (lik.Z[0] != 0)) if len(lik.Z) else []
        lik._z_intercept = int(const[0]) if len(const) else None
    return lik._z_intercept
