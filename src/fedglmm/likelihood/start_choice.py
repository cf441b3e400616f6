"""The choice of the start the Newton iteration goes on from, among the points of its first round (the
hybrid's several starts: the one-shot estimate, the sites' own fits combined, the site totals' start)."""
from __future__ import annotations

import numpy as np


def newton_step(g, H):
    """−H⁻¹g if H is positive definite, else None."""
    try:
        c = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return None
    return -np.linalg.solve(c.T, np.linalg.solve(c, g))


def held_step(g: np.ndarray, H: np.ndarray, free: int) -> tuple | None:
    """The Newton step in the first ``free`` coordinates, the others held, as (step, predicted decrease);
    None where their block of H is not positive definite or the step gains nothing.  The fixed effects' own
    step: it profiles a start (:func:`profiled`), and where H is indefinite (a variance of a few hospitals'
    effects) it is one more candidate of the round (TrustRegionNewton.held), as the trust region bounds every
    coordinate's step by its radius though the fixed effects' block is positive definite -- an intercept 0.73
    below its optimum, H indefinite along the hospitals' SD (with the intercept), took 8 of the fit's 12
    rounds of trust-region steps to get there."""
    inner = newton_step(g[:free], H[:free, :free]) if free else None
    if inner is None:
        return None
    s = np.zeros_like(g)
    s[:free] = inner
    pred = float(-(g @ s + 0.5 * s @ H @ s))
    return (s, pred) if pred > 0 else None


# A start is taken for its fixed effects profiled (:func:`profiled`) only where the lowest start is not
# settled (its decrement is PROFILE_SETTLED or more), the fixed effects' own Newton step gains at most
# PROFILE_CAP (beyond, their quadratic model says little of where that step lands: a binary start at
# −ℓ = 2266.7 "profiled" to 1369.5, 58 below the optimum), and the profiled value beats the lowest start's
# by more than PROFILE_MARGIN (nearer, the lower decrement of the lowest start counts for more: a penalised
# fit over 3 sites, 3 -> 4 rounds).  benchmarks/stress_methods.py, 2000 fits (seeds 1-20): 6 fits a round or
# two shorter (seed 17 fit 63 7 -> 5, seed 5 fit 25 7 -> 6), none longer; without PROFILE_SETTLED a
# poisson start 157 above the optimum, profiled to 6 below it, was preferred to one with decrement 0.3
# (seed 12 fit 91, 4 -> 5 rounds).  Not with several grouping factors (likelihood.fit): of the 53 three-site
# splits of benchmarks/parity_multilevel.py it changed one, for the worse (arabidopsis_olre 9 -> 10 rounds).
# Nor where the profiled value lies below the lowest start's value less its Newton decrement (twice the gain
# its full Newton step promises; a profile in β cannot go below the optimum): guimmun with every community a
# site, 3.8 above the optimum at the lowest start (decrement 6.8), another profiled to 5.1 below the optimum
# (a gain of 61 predicted, capped at PROFILE_CAP) was taken, 125 above it in decrement: 5 rounds, now 4.
PROFILE_CAP = 100.0
PROFILE_MARGIN = 1.0
PROFILE_SETTLED = 1.0


def profiled(pt, fixed: int) -> float:
    """A start's value with its first ``fixed`` coordinates (the fixed effects) moved to their best for the
    rest, as their own quadratic model says: f − ½ g_βᵀ H_ββ⁻¹ g_β, or f where H_ββ is not positive
    definite or that gain exceeds PROFILE_CAP.  Starts combined from sites' fits are often off in β for
    their θ alone (a site's fit at a singular Σ drags β with it), and that part is the one a Newton round
    puts right."""
    f, g, H = pt[1], pt[2], pt[3]
    held = held_step(g, H, fixed) if fixed > 0 else None
    return f - held[1] if held is not None and held[1] <= PROFILE_CAP else f


def best_start(pts, finite, fixed: int = 0) -> int:
    """The start to go on from (``pts``: (x, f, g, H); ``fixed``: how many leading coordinates are fixed
    effects): the lowest, or where that one is not settled another whose value with its fixed effects
    profiled is clearly lower (see PROFILE_CAP); among them the one with a sound Newton step (H positive
    definite), unless one without is lower than that one's value less its decrement (taken as at most 2:
    beyond, its quadratic model says little of where its step lands)."""
    value = {i: pts[i][1] for i in finite}
    best = min(finite, key=value.get)
    steps = {i: newton_step(pts[i][2], pts[i][3]) for i in finite}
    if fixed and not (steps[best] is not None and -(pts[best][2] @ steps[best]) < PROFILE_SETTLED):
        prof = {i: profiled(pts[i], fixed) for i in finite}
        alt = min(finite, key=prof.get)
        # (not below the lowest start's value less its decrement, twice the gain its full Newton step promises)
        floor = value[best] + pts[best][2] @ steps[best] if steps[best] is not None else -np.inf
        if floor - PROFILE_MARGIN <= prof[alt] < prof[best] - PROFILE_MARGIN:
            best, value = alt, prof
    pd = [i for i in finite if steps[i] is not None]
    if not pd or best in pd:
        return best
    sound = min(pd, key=value.get)
    dec = -(pts[sound][2] @ steps[sound])
    return best if value[best] < value[sound] - min(dec, 2.0) else sound
