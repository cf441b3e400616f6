"""Steps of the coordinator's Newton iteration (:mod:`fedglmm.likelihood.newton`): the trust-region
subproblem (:func:`trust_region_subproblem`), and two repairs where Newton's steps fall short of the optimum
or wander off a zero.

* :func:`log_scale_step`: below its optimum a standard deviation's log-likelihood flattens as the SD grows
  (the curvature in it falls), so Newton's step takes it only part of the way, round after round (a
  hospital SD started at a quarter of its value took five rounds to get there).  The step of the quadratic
  model with the growing SDs on the log scale carries that fall, and goes further.
* :func:`tail_step`: a negative binomial's log-likelihood approaches the poisson one as ψ = log ϑ grows, like
  e^(−ψ): where the data are not overdispersed its optimum is ψ = ∞, and Newton's steps in ψ add about 1 a
  round (sim_epil over 3 sites: 9 rounds).  In α = e^(−ψ) the objective is smooth up to α = 0, so the
  step of the quadratic model in α reaches the poisson limit (or a large ψ) in one; there :func:`held` holds
  it, and no point goes beyond (:func:`capped`).
* :func:`even_at_zero`: the objective is even in each diagonal entry of Λ, so where one is exactly 0 its
  gradient and its cross-curvatures vanish; sums whose Hessian comes from differences (several grouping
  factors) carry an error there that would move the entry off 0 with every step in the others.
"""
from __future__ import annotations

import numpy as np

from .start_choice import newton_step

GROW = 1.05        # a standard deviation the Newton step grows by more than this factor gets the log step
MAX_FACTOR = 4.0   # the log step changes a standard deviation by at most this factor either way
TAIL_CAP = 30.0    # ψ that stands for α = e^(−ψ) = 0 at least (the poisson limit: ϑ = 1e13) ...
TAIL_GAIN = 1e-12  # ... and further where F would fall by more than this beyond it (tail_step's landing, _land)
TAIL_HELD = 1e-10  # a ψ beyond TAIL_CAP whose ∂F/∂ψ ≤ 0 (F falls by that on to ψ = ∞) is above −this is held
PSI_MAX = 300.0    # no point goes beyond: F's ψ-derivatives overflow from ψ ≈ 355 (ϑ² in double precision)


def log_scale_step(x: np.ndarray, g: np.ndarray, H: np.ndarray, newton: np.ndarray, diagonal) -> tuple | None:
    """Where the Newton step ``newton`` grows entries of ``diagonal`` (the positions of Λ's diagonal, the
    standard deviations of scalar terms) by more than 5 %: the Newton step with those entries on the log
    scale, y = log|x| -- gradient x·g, Hessian x_a x_b H_ab plus x·g on the diagonal (the second derivative
    of x in y), smaller than x² H where g < 0 -- as (step in x, predicted decrease); None if none grows so
    or that model is not convex."""
    diag = np.asarray(diagonal, dtype=np.int64)
    grow = diag[(np.abs(x[diag]) > 1e-3) & (np.abs(x[diag] + newton[diag]) > GROW * np.abs(x[diag]))]
    if not grow.size:
        return None
    J = np.ones(len(x))
    J[grow] = x[grow]                                     # dx/dy = x
    gy = J * g
    Hy = H * np.outer(J, J)
    Hy[grow, grow] += x[grow] * g[grow]                   # + (d²x/dy²) g = x g
    sy = newton_step(gy, Hy)
    if sy is None:
        return None
    sy[grow] = np.clip(sy[grow], -np.log(MAX_FACTOR), np.log(MAX_FACTOR))
    step = J * sy
    step[grow] = x[grow] * np.expm1(sy[grow])
    pred = float(-(gy @ sy + 0.5 * sy @ Hy @ sy))
    return (step, pred) if pred > 0 else None


def tail_step(x: np.ndarray, g: np.ndarray, H: np.ndarray, newton: np.ndarray | None, tails,
              prefer: bool = False, even=()) -> tuple | None:
    """Where the Newton step ``newton`` grows entries of ``tails`` (ψ = log ϑ of a negative binomial), or where
    one is at its poisson limit (``TAIL_CAP`` or beyond) but F rises towards it (∂F/∂ψ > 0: the limit is not the
    optimum, whose F falls towards ψ = ∞ there), or F rises and is not convex (``newton`` None; F's curvature in ψ
    is negative in e^(−ψ)'s range, where the model in α may well be convex): the
    Newton step with those entries as α = e^(−ψ) -- gradient −g/α, Hessian H_ab/(α_a α_b) for them plus
    g/α² on the diagonal (the second derivative of ψ in α) -- with α kept ≥ 0: an α that the step takes
    below 0 is set to 0 (ψ = ``_land``'s) and the other entries minimise the model with it held there.  As
    (step in x, predicted decrease, whether it reaches the limit); None if no entry grows or comes back, the
    model is not convex or its step is no longer than Newton's (coming back: does not come back).  ``prefer``
    (:func:`alpha_predicts`): every entry of ``tails`` in α, whatever the Newton step, and the step is the
    one the iteration takes where it ends (returned as reaching the limit).  Where H is indefinite, the
    coordinates of ``even`` at 0 with a negative curvature are held there -- an SD that F falls away from, with
    which the model in α had no step: ψ then came back from 12 a little a round, by the trust region's steps
    (benchmarks/nb_poisson_limit.py --seed 7 --theta 0.5,2,10,100, fit 15: 13 rounds, now 7)."""
    tails = np.asarray(tails, dtype=np.int64)
    land = _land(x, g, tails)
    back = (g[tails] > 0) & ((x[tails] >= TAIL_CAP) | (newton is None))
    keep = back | (np.zeros(len(tails), bool) if newton is None else (newton[tails] > 0) & (x[tails] < land)) \
        | prefer
    grow, land, back = tails[keep], land[keep], back[keep]
    if not grow.size:
        return None
    a = np.exp(-x[grow])
    J = np.ones(len(x))
    J[grow] = -1.0 / a                                    # dψ/dα
    ga = J * g
    Ha = H * np.outer(J, J)
    Ha[grow, grow] += g[grow] / a ** 2                    # + (d²ψ/dα²) g
    hold = np.asarray([i for i in even if x[i] == 0.0 and H[i, i] < 0.0] if newton is None else [], dtype=np.int64)
    if hold.size:
        ga[hold] = 0.0
        Ha[hold, :] = 0.0
        Ha[:, hold] = 0.0
        Ha[hold, hold] = 1.0
    sa = newton_step(ga, Ha)
    if sa is None:
        return None
    low = grow[a + sa[grow] <= 0.0]
    if low.size:
        # α held at 0: the other entries minimise the model there
        rest = np.setdiff1d(np.arange(len(x)), low)
        sa = np.zeros(len(x))
        sa[low] = -a[np.isin(grow, low)]
        try:
            sa[rest] = -np.linalg.solve(Ha[np.ix_(rest, rest)], ga[rest] + Ha[np.ix_(rest, low)] @ sa[low])
        except np.linalg.LinAlgError:
            return None
    pred = float(-(ga @ sa + 0.5 * sa @ Ha @ sa))
    step = sa.copy()
    new = np.maximum(a + sa[grow], np.exp(-land))
    step[grow] = -np.log(new) - x[grow]
    further = step[grow] < 0 if newton is None else np.where(back, step[grow] < 0, step[grow] > newton[grow])
    if pred <= 0 or not (prefer or np.any(further)):
        return None
    return step, pred, bool(low.size) or prefer


ALPHA_FROM = 5.0    # a ψ from which its quadratic model in α = e^(−ψ) may be preferred (ϑ ≥ 150: alpha_predicts)
ALPHA_BETTER = 0.5  # ... where its error in the gradient at the point before is below this share of ψ's


def alpha_predicts(prev, cur, tails) -> bool:
    """Whether the quadratic model at ``cur`` with the entries of ``tails`` (ψ, all ≥ ALPHA_FROM) in α = e^(−ψ)
    predicts F's gradient at the point before, ``prev``, better than the model in ψ (its error below ALPHA_BETTER
    of the other's, both as ψ-gradients, scaled by √|diag H|).  Where ϑ is large but finite, F's fall towards the
    poisson limit (like e^(−ψ)) makes F far from quadratic in ψ, and Newton's steps in ψ contracted slowly, a round
    at a time (benchmarks/nb_poisson_limit.py: fits of 9 rounds, 5 of them final ones in ψ alone)."""
    tails = np.asarray(tails, dtype=np.int64)
    if prev is None or not tails.size or prev.x.shape != cur.x.shape \
            or np.any(cur.x[tails] < ALPHA_FROM) or np.any(prev.x[tails] < ALPHA_FROM):
        return False
    dx = prev.x - cur.x
    e_psi = prev.g - (cur.g + cur.H @ dx)
    Jc, Jp = np.ones(len(cur.x)), np.ones(len(cur.x))
    Jc[tails], Jp[tails] = -np.exp(cur.x[tails]), -np.exp(prev.x[tails])        # dψ/dα
    Hy = cur.H * np.outer(Jc, Jc)
    Hy[tails, tails] += cur.g[tails] * np.exp(2.0 * cur.x[tails])
    dy = dx.copy()
    dy[tails] = np.exp(-prev.x[tails]) - np.exp(-cur.x[tails])
    e_alpha = (Jp * prev.g - (Jc * cur.g + Hy @ dy)) / Jp
    D = np.sqrt(np.maximum(np.abs(np.diag(cur.H)), 1e-300))
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.linalg.norm(e_alpha / D) < ALPHA_BETTER * np.linalg.norm(e_psi / D))


def _land(x: np.ndarray, g: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """Where each ψ of ``tails`` stands for its poisson limit: F ≈ F(∞) + c e^(−ψ), c = −∂F/∂ψ e^ψ
    from the point ``x`` (``g``: ∂F), so F falls by c e^(−ψ) from ψ to ∞; the ψ where that is TAIL_GAIN, at
    least TAIL_CAP (counts of 1e4 left 1e-7 of F beyond ψ = 30, and their fit 5e-8 from the limit)."""
    c = np.maximum(-g[tails], 0.0) * np.exp(np.minimum(x[tails], PSI_MAX))
    with np.errstate(divide="ignore"):
        return np.clip(np.log(c / TAIL_GAIN), TAIL_CAP, PSI_MAX)


def even_at_zero(x: np.ndarray, g: np.ndarray, H: np.ndarray, even) -> tuple:
    """(g, H) with the symmetry of F restored at the coordinates of ``even`` that are exactly 0: there the
    gradient and the Hessian's cross terms are 0 (forward differences had put ~1e-2 into a cross term, and
    the Newton step then left the zero by 1e-4, to come back a round later)."""
    zero = [i for i in even if x[i] == 0.0]
    if not zero:
        return g, H
    g, H = g.copy(), H.copy()
    for i in zero:
        g[i] = 0.0
        diag = H[i, i]
        H[i, :] = 0.0
        H[:, i] = 0.0
        H[i, i] = diag
    return g, H


def held(x: np.ndarray, g: np.ndarray, H: np.ndarray, even, tails) -> tuple:
    """(g, H) as :func:`even_at_zero` leaves them, with each entry of ``tails`` (a negative binomial's ψ) at
    ``TAIL_CAP`` or beyond, where F falls (not rises: :func:`tail_step` comes back) by less than TAIL_HELD on to
    ψ = ∞, held there: its gradient and cross terms 0, its curvature 1.  Its ψ-derivatives there are F's flat
    tail and rounding, and Newton's step in them took ψ from 30 to 220 and on, where they overflow (NaN from
    ψ ≈ 355), for two rounds more (sim_epil as a negative binomial over 3 sites, tests/test_rounds.py: 7 rounds
    on one machine, 6 on another)."""
    g, H = even_at_zero(x, g, H, even)
    cap = [i for i in tails if x[i] >= TAIL_CAP and -TAIL_HELD <= g[i] <= 0.0]
    if not cap:
        return g, H
    g, H = g.copy(), H.copy()
    g[cap] = 0.0
    H[cap, :] = 0.0
    H[:, cap] = 0.0
    H[cap, cap] = 1.0
    return g, H


def capped(x: np.ndarray, tails, cur) -> np.ndarray:
    """The point ``x`` with each entry of ``tails`` no further than where it stands for its poisson limit from the
    current point ``cur`` (:func:`_land`, and not below ``cur``'s own): beyond, F is flat to TAIL_GAIN, and a
    step there (the trust region's, scaled by a curvature of e^(−ψ)) went to ψ = 300, from which F's rise towards
    the limit, of e^(−300), could not bring it back (counts fitted as negative binomial:
    benchmarks/nb_poisson_limit.py)."""
    tails = np.asarray(tails, dtype=np.int64)
    if not tails.size:
        return x
    top = np.maximum(_land(cur.x, cur.g, tails), cur.x[tails])
    if np.all(x[tails] <= top):
        return x
    x = x.copy()
    x[tails] = np.minimum(x[tails], top)
    return x


def even_third(x: np.ndarray, T: np.ndarray, even) -> np.ndarray:
    """F's third derivatives T with its symmetry restored at the coordinates of ``even`` that are exactly 0, as
    :func:`even_at_zero` does for g and H: an entry with an odd number of such indices is 0 (the sites' forward
    differences put half a fourth derivative times their step there, and a singular fit's standard errors
    moved by 4e-6 with it)."""
    zero = np.zeros(len(x), bool)
    zero[[i for i in even if x[i] == 0.0]] = True
    if not zero.any():
        return T
    odd = (zero[:, None, None].astype(int) + zero[None, :, None] + zero[None, None, :]) % 2 == 1
    return np.where(odd, 0.0, T)


def trust_region_subproblem(g, H, radius):
    """Minimise gᵀy + ½ yᵀHy over ‖y‖ ≤ radius (eigen-decomposition and a root search on μ)."""
    lam, Q = np.linalg.eigh(H)
    a = Q.T @ g
    lo = max(0.0, -lam[0]) + 1e-14 * max(1.0, abs(lam[-1]))

    def norm(mu):
        return np.linalg.norm(a / (lam + mu))

    if lam[0] > 0 and norm(0.0) <= radius:
        return -Q @ (a / lam)
    if norm(lo) <= radius:
        # hard case: move to the boundary along the eigenvector of the smallest eigenvalue
        y = -Q @ (a / (lam + lo))
        rest = np.sqrt(max(radius**2 - y @ y, 0.0))
        return y + rest * Q[:, 0]
    hi = lo + max(1.0, np.linalg.norm(g) / radius)
    while norm(hi) > radius:
        hi = lo + 2.0 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if norm(mid) > radius:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return -Q @ (a / (lam + hi))

