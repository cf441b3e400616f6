"""The third derivatives T of ℓ(φ) at a final point of a GLMM with levels shared by sites, and its Hessian
there moved to the tangent the round found -- from the final round's own points (no extra round).

The round evaluates the point x = (v̄, φ) and x ± h_j (τ̄_j, e_j) for each j (:mod:`.shared_glmm_rounds`); a
final round planned from a point :func:`close` to φ also evaluates x + (τ̄e, e), e = h_b e_b + h_c e_c, for
1 ≤ b < c < P (:func:`triple_points`: (P − 1)(P − 2)/2 points).  With g the gradient the round computes at
a point:

- T[i, j, j] = (g₊ⱼ − 2 g + g₋ⱼ)_i / h_j² for every i, j: every entry with at most two distinct indices;
- T[a, b, c] = (g₊_b₊_c − g₊_b − g₊_c + g)_a / (h_b h_c) for a < b < c: the rest.

Second differences over steps of 1e-5 want the gradients at every point computed alike: each in the form
of the difference points (Γ̂'s error corrected with the centre's ∂S; the centre's own form, with its exact
∂S, differs by a term small against the gradient but not against h² T) and moved to its own v's mode
(:func:`~.shared_ends.log_det_to_mode`: at x ± h τ̄ the mode lies O(h²) off, which changes the gradient by O(h²) too).  On
``benchmarks/stress_shared.py``'s fit 8, against central differences of the Hessian at points 1e-3 and
1e-4 apart with v settled: without the move T was off by 1 % of its largest entry (entries near 0 by more
than themselves), without the alike centre by 1.3e-3, with both by 2e-5.

The Hessian's columns are differences along (τ̄_j, e_j), τ̄ the tangent predicted before the round; the
profile moves along the tangent τ the round found.  The difference is (∂_v g)(τ̄_j − τ_j), whose
log-determinant part (the rest vanishes at v's mode) is known from the same differences
(:func:`tangent_fix`, as ``log_det_to_mode`` moves the gradient along δv); every final round's Hessian is
so moved.  With τ̄ off by 1e-3 (relative) the Hessian was off by 2.9e-5 of its size, and 1.7e-7 so moved
(at 1e-4: 2.9e-6 and 1.6e-8; ``tests/test_shared_third.py``).

T serves the last step (to third order, the information moved along it: :mod:`fedglmm.likelihood.newton_end`)
only where the round's predictions -- τ̄ and Γ̂ at the point -- were within FINAL_TANGENT and FINAL_GAMMA
(relative) of what it found (:func:`trusted`): the Hessian's error is of the first order in Γ̂'s (it
contracts the sites' ∂S), which no difference here removes.  Elsewhere a last step longer than 1e-7 in the
Hessian's norm is settled by one more final round (``likelihood.fit.BARE_SETTLE``), as before.
"""
from __future__ import annotations

import numpy as np

from .shared_ends import _gamma_off, along_tangents, log_det_to_mode

FINAL_TANGENT = 1e-5    # the largest relative errors of τ̄ ...
FINAL_GAMMA = 3e-7      # ... and of Γ̂ at which a final round's T and Hessian are used (see trusted)
NEAR = 1e-3             # a final round planned from within this of its φ carries the mixed points (see close)


def close(phi_near: np.ndarray, phi: np.ndarray) -> bool:
    """Whether a final round at φ planned from a point at ``phi_near`` carries the mixed points: within NEAR
    (relative, largest entry).  From farther its prediction of τ and Γ̂ is mostly not :func:`trusted`, and the
    points would only cost the sites: on stress_shared.py's first 40 fits the final rounds planned from 1e-3
    or farther were trusted in 1 of 16, from nearer in 39 of 68 (verbagg_la over 4 sites: 46 % more bytes
    with the points in every final round, 31 % in those planned from nearer).  Not left out of the round that
    settles a last step (planned from the end of a final round, within the step): T moves the information over
    that round's own last step, and without it 4 more rounds in all on stress_shared.py's 60 fits and 4 on its
    --seed 100 ones settled such steps."""
    return float(np.max(np.abs(phi - phi_near) / (1.0 + np.abs(phi)), initial=0.0)) < NEAR


def pairs(P: int) -> list[tuple[int, int]]:
    """The pairs b < c of φ's coordinates whose mixed point the final round carries: those without 0 (with
    the gradient's entry a < b they give every T[a, b, c] of three distinct indices)."""
    return [(b, c) for b in range(1, P) for c in range(b + 1, P)]


def triple_points(phi: np.ndarray, v: np.ndarray, h: np.ndarray, taubar: np.ndarray) -> list:
    """The final round's mixed points (v̄ + τ̄e, φ + e), e = h_b e_b + h_c e_c for (b, c) in :func:`pairs`."""
    out = []
    for b, c in pairs(len(phi)):
        e = np.zeros(len(phi))
        e[b], e[c] = h[b], h[c]
        out.append((v + taubar @ e, phi + e))
    return out


def third(centre, others: list, diffs: tuple, h: np.ndarray) -> np.ndarray | None:
    """T of ℓ at the round's point from its gradients: ``centre`` the point assessed in the difference points'
    form, ``others`` the 2P difference points and then the :func:`triple_points`, ``diffs`` their
    :func:`~.shared_ends.differences`; each gradient moved to its own v's mode (to first order in its δv,
    :func:`~.shared_ends.log_det_to_mode`); None where not finite."""
    P = len(h)
    g0 = centre.grad - 0.5 * log_det_to_mode(centre, diffs)
    g = [pt.grad - 0.5 * log_det_to_mode(pt, diffs) for pt in others]
    D = np.stack([(g[2 * j] - 2.0 * g0 + g[2 * j + 1]) / h[j] ** 2 for j in range(P)], axis=1)  # D[i, j] = T[i, j, j]
    T = np.empty((P, P, P))
    idx = np.arange(P)
    for j in range(P):
        for k in range(P):
            # T[i, j, k] with j == k, or i equal to one of them: an entry of D
            T[:, j, k] = D[:, j] if j == k else np.where(idx == j, D[k, j], np.where(idx == k, D[j, k], np.nan))
    for at, (b, c) in enumerate(pairs(P)):
        mixed = (g[2 * P + at] - g[2 * b] - g[2 * c] + g0) / (h[b] * h[c])
        for a in range(b):
            for i, j, k in ((a, b, c), (a, c, b), (b, a, c), (b, c, a), (c, a, b), (c, b, a)):
                T[i, j, k] = mixed[a]
    return T if np.all(np.isfinite(T)) else None


def tangent_fix(centre, diffs: tuple, taubar: np.ndarray) -> np.ndarray:
    """What the Hessian's columns, differences along (τ̄_j, e_j), take to be along (τ_j, e_j) (symmetrised):
    entry (k, j) is −(∂_v g_k)(τ̄_j − τ_j) = ½ ∂_w(D_φk + D_v·τ_k), w = τ̄_j − τ_j, by the identities of
    ``log_det_to_mode`` (∂_w D_v from the mixed partial along (τ_k, e_k), ∂_w τ_k = −C⁻¹(∂_{T_k} C) w:
    :func:`~.shared_ends.along_tangents`)."""
    out = 0.5 * along_tangents(centre, diffs, taubar - centre.tau)
    return 0.5 * (out + out.T)          # (the Hessian's symmetric part is kept)


def trusted(centre, taubar: np.ndarray, gamma_sent: np.ndarray) -> bool:
    """Whether the round predicted τ and Γ at its point to within FINAL_TANGENT and FINAL_GAMMA (largest entries,
    relative).  τ̄'s error moves the Hessian to first order, but :func:`tangent_fix` takes that off (it leaves the
    second order); Γ̂'s moves it by up to ~3 % of Γ̂'s relative error, and nothing here takes it off.  On
    ``benchmarks/stress_shared.py``'s 60 fits and its ``--seed 100`` ones, where the last final round had Γ̂ off by
    at most 1e-5 the standard errors were up to 4.7e-8 from the pooled fit's (6 above 1e-8), by 1e-6 up to 4.7e-8
    (3), by 3e-7 up to 6.4e-9."""
    scale = float(np.abs(centre.tau).max(initial=0.0))
    off = float(np.abs(taubar - centre.tau).max(initial=0.0)) / scale if scale > 0 else 0.0
    return off <= FINAL_TANGENT and _gamma_off(centre, gamma_sent) <= FINAL_GAMMA
