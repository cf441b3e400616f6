"""The coordinator's steps to third order (:mod:`fedglmm.likelihood.newton_end`), in θ or in the squares of
the standard deviations, whichever agrees with itself better.

From a point with gradient g, Hessian H and third derivatives T of F, two steps leave an error of fourth
order: s solving g + Hs + ½T[s, s] = 0, and Chebyshev's s_N − ½H⁻¹T[s_N, s_N] (s_N Newton's).  Their
difference measures that error (``land``: the decrement predicted to be left, in the norm of H).  Both depend
on the coordinates the Taylor series is taken in.  The objective is even in each standard deviation θ_i of a
scalar term (a diagonal entry of Λ): a function of θ_i², and near a small SD far closer to a cubic in θ_i²
than in θ_i.  So the same steps are also taken in y, y_i = θ_i² for those entries (the others unchanged) --
g_y = Jg, H_y = JHJ + diag(g x''), T_y = T[J, J, J] + the map's terms (x(y) = sign(θ)√y is separable:
J = diag(x'), x' = 1/(2θ), x'' = −1/(4θ³), x''' = 3/(8θ⁵)) -- and mapped back; the pair with the smaller
``land`` (each in its own coordinates' norm) is used.  On cbpp_olre over 3 sites, from a decrement of 1.6e-3
(herd SD 0.13, its optimum 0.10) the mean of the pair in θ left 1.9e-6 (``land`` 1.2e-5), in y 3.3e-11
(``land`` 3.3e-9); simulated rare events by quadrature over 5 sites, from 0.039, 8.4e-6 (3.6e-5) against
3.4e-7 (9.1e-7); toenail over 10 sites, from 0.056 (SD 4), 2.4e-6 (2.1e-5) against 4e-6 (3.8e-5): θ kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .start_choice import newton_step

SQUARED_FROM = 1e-4     # a standard deviation at least this far from 0 (times max(1, |x|∞)) is squared


@dataclass
class ThirdSteps:
    """Steps in x (from the point): ``s`` to third order, Chebyshev's ``cheb``, their ``mean``; ``land`` their
    difference's square in the norm of the coordinates' H; ``pred`` the cubic model's decrease at each of
    (s, cheb, mean); ``squared``: taken in the squares of the SDs."""
    s: np.ndarray
    cheb: np.ndarray
    mean: np.ndarray
    land: float
    pred: tuple
    squared: bool = False


def plain_steps(g: np.ndarray, H: np.ndarray, T: np.ndarray, newton: np.ndarray) -> tuple | None:
    """(Chebyshev's step, the step to third order: fixed-point iteration from Newton's ``newton``), or None
    where either is not finite."""
    try:
        cheb = newton - 0.5 * np.linalg.solve(H, np.einsum("ijk,j,k->i", T, newton, newton))
        s = newton
        for _ in range(30):
            s = -np.linalg.solve(H + 0.5 * (T @ s), g)
    except np.linalg.LinAlgError:
        return None
    return (cheb, s) if np.all(np.isfinite(cheb)) and np.all(np.isfinite(s)) else None


def _in(g, H, T, newton) -> tuple | None:
    """(cheb, s, mean, land, pred) in the coordinates of g, H and T."""
    steps = plain_steps(g, H, T, newton) if newton is not None else None
    if steps is None:
        return None
    cheb, s = steps
    mean, miss = 0.5 * (s + cheb), s - cheb
    return cheb, s, mean, float(miss @ H @ miss), tuple(cubic_decrease(g, H, T, x) for x in (s, cheb, mean))


def cubic_decrease(g: np.ndarray, H: np.ndarray, T: np.ndarray, s: np.ndarray) -> float:
    """The decrease of F's cubic model -(gᵀs + ½sᵀHs + T[s, s, s]/6) over the step s."""
    return float(-(g @ s + 0.5 * s @ H @ s + np.einsum("ijk,i,j,k->", T, s, s, s) / 6.0))


def squared_model(x: np.ndarray, g: np.ndarray, H: np.ndarray, T: np.ndarray, idx: np.ndarray) -> tuple:
    """(g_y, H_y, T_y): F's derivatives in y, y_i = x_i² at ``idx``, x_i elsewhere."""
    P = len(x)
    d1, d2, d3 = np.ones(P), np.zeros(P), np.zeros(P)
    d1[idx], d2[idx], d3[idx] = 0.5 / x[idx], -0.25 / x[idx] ** 3, 0.375 / x[idx] ** 5
    gy = d1 * g
    Hy = H * np.outer(d1, d1) + np.diag(g * d2)
    C = H * np.outer(d2, d1)                 # F_ij x''_i x'_j: the terms where two of the three indices meet
    Ty = T * np.einsum("i,j,k->ijk", d1, d1, d1)
    i = np.arange(P)
    Ty[i, :, i] += C                         # δ_ik F_ij x''_i x'_j
    Ty[:, i, i] += C.T                       # δ_jk F_ij x'_i x''_j
    Ty[i, i, :] += C                         # δ_ij F_ik x''_i x'_k
    Ty[i, i, i] += g * d3
    return gy, Hy, Ty


def third_steps(x: np.ndarray, g: np.ndarray, H: np.ndarray, T: np.ndarray, newton, even) -> ThirdSteps | None:
    """The steps to third order from x (see the module docstring) in θ and, where ``even`` (the SDs' positions)
    has entries away from 0, in their squares: the pair with the smaller ``land``; None where neither can be
    taken (``newton``: Newton's step in x, or None)."""
    plain = _in(g, H, T, newton)
    out = ThirdSteps(plain[1], plain[0], plain[2], plain[3], plain[4]) if plain is not None else None
    idx = np.asarray([i for i in even if abs(x[i]) > SQUARED_FROM * max(1.0, float(np.max(np.abs(x))))], np.int64)
    if not idx.size:
        return out
    gy, Hy, Ty = squared_model(x, g, H, T, idx)
    sq = _in(gy, Hy, Ty, newton_step(gy, Hy))
    if sq is None or out is not None and not sq[3] < out.land:
        return out
    y = np.array(x, float)
    y[idx] = x[idx] ** 2

    def back(step):
        z = y + step
        if np.any(z[idx] < 0.0):
            return None
        z[idx] = np.sign(x[idx]) * np.sqrt(z[idx])
        return z - x
    cheb, s, mean = (back(v) for v in sq[:3])
    if cheb is None or s is None or mean is None:
        return out
    return ThirdSteps(s, cheb, mean, sq[3], sq[4], True)
