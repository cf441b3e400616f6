"""A start that takes each parameter from the source that knows it: the between-group ones from the one-shot fit,
the within-group slopes from the sites' own fits.

A site's fit of a few groups estimates the slopes of covariates that vary within its groups well, but its
intercept and the coefficients of group-level covariates only through its few groups' random effects.  Combined
by their information the fits then lean towards the sites whose groups have the larger effects wherever the
information grows with the effect -- a log link's with the group's rate: for a normal effect of SD σ, the
information-weighted mean of the effects is σ², not 0 (60 sites of 3 poisson groups of 100 rows, σ = 1.5: the
combined intercept 2.57 for 0.46, the group-level covariate's −0.39 for 0.19).  The one-shot fit from the groups'
moments knows the between-group structure (intercept, group-level coefficients, the covariance) but, for counts
or binary outcomes beside real covariates, not the within-group slopes (0.38 for 0.50 there).  Each from its
source, the start was 9.5 from the optimum in −ℓ where the best of the others was 204: 5 -> 4 rounds.
"""
from __future__ import annotations

import numpy as np

LEVEL_TOL = 1e-9      # a column's within-group sum of squares below this (relative) is constant within its groups


def group_level(designs: list, p: int) -> np.ndarray | None:
    """Which of the ``p`` fixed-effect columns are constant within every group of every design (the intercept,
    group-level covariates) -- the pseudo-data of the one-shot fit, which keep a group-level covariate constant
    within its group; None where a design is missing."""
    level = np.ones(p, bool)
    for d in designs:
        if d is None or d.X.shape[1] != p:
            return None
        if not d.group.size:
            continue
        G = int(d.group.max()) + 1
        n = np.maximum(np.bincount(d.group, minlength=G), 1).astype(float)
        for j in np.flatnonzero(level):         # each column's within-group sums of squares, Σ x² − (Σ x)²/n
            s1, s2 = np.bincount(d.group, d.X[:, j], G), np.bincount(d.group, d.X[:, j] ** 2, G)
            level[j] = np.max(s2 - s1 ** 2 / n) <= LEVEL_TOL * max(1.0, float(np.max(s2)))
    return level


def split_start(fits: list, x0: np.ndarray, between: np.ndarray) -> np.ndarray | None:
    """The quadratic combination of the sites' fits ``fits`` (:class:`~fedglmm.coordinator.starts.OwnPart`) with
    the entries ``between`` (indices: the group-level columns and θ̃) at the one-shot fit's ``x0``; None if it
    is singular or not finite.  The other entries are the combination's own, not its minimiser given those
    (:func:`~fedglmm.coordinator.starts.given_theta`): the fits' coupling carries the lean of their intercept into
    the slopes (draw 402: x 0.65 for 0.50 so, 1786 above the optimum in −ℓ; kept as they are, 9.5)."""
    K, h = sum(o.K for o in fits), sum(o.h for o in fits)
    try:
        x = np.linalg.lstsq(K, h, rcond=None)[0]
    except (np.linalg.LinAlgError, ValueError):
        return None
    x[between] = np.asarray(x0, float)[between]
    return x if np.all(np.isfinite(x)) else None


def one_shot_split(own: dict, parts: dict, st, x0: np.ndarray) -> list:
    """[:func:`split_start`] from the sites' fits ``own`` {site: OwnPart or None}, the one-shot fit's stand-ins
    ``parts`` {site: :class:`~fedglmm.coordinator.virtual.Part`} and its estimate ``x0`` (γ, θ̃): the group-level
    columns (:func:`group_level`) and every θ̃ entry from x0; [] where there is nothing to split (no random
    effects: no groups to be between)."""
    fits = [o for o in own.values() if o is not None]
    p = len(st.names)
    level = group_level([part.design for part in parts.values()], p) if fits and np.any(st.mask) else None
    if level is None or not level.any():
        return []
    x = split_start(fits, x0, np.r_[np.flatnonzero(level), p + np.arange(int(np.sum(st.mask)))])
    return [] if x is None else [x]
