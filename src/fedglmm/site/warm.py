"""Where a site's engine starts its modes in the first Newton round: from its own fit's.

The own fit (:mod:`fedglmm.site.own_fit`) ends with each group's mode û at its last point and the modes'
derivative dû/dφ there; both stay at the site (never sent) and start the engine of the agreed internal scale.
"""
from __future__ import annotations

import numpy as np

from ..model.spec import Design


def slope_of(engine, transform: np.ndarray, zscale: np.ndarray, names: list) -> tuple | None:
    """(φ, dû/dφ, transform, zscale, the columns' names) of an engine's last evaluation on its internal
    scale (X̃ = X·transform, Z̃ = Z / zscale), where it has one grouping factor and no dispersion
    parameter; else None."""
    last = getattr(engine, "_last", None)
    if last is None or getattr(engine, "ntheta", None) is None or len(last[0]) != len(names) + engine.ntheta:
        return None
    return last[0], last[1], np.asarray(transform, float), np.asarray(zscale, float), names


def warm_start(engine, design: Design, levels: list, modes: np.ndarray, slope: tuple | None = None,
               transform: np.ndarray | None = None, zscale: np.ndarray | None = None) -> None:
    """Start a fresh engine's modes (spherical û, which do not depend on the internal scale) from the site's
    own fit's, group by group: the first Newton round then begins where the own fit ended rather than at
    zero.  Nothing happens unless every group of ``design`` has a mode of the same size.  With the own
    fit's ``slope`` (:func:`slope_of`) and the engine's ``transform`` and ``zscale``, the engine also takes
    the own fit's last point and dû/dφ, carried to its own internal scale (both scales are linear in
    (β, Λ): γ_own = T_own⁻¹ T γ, θ̃_own = zs_own/zs θ̃ entry by entry), so that its first evaluation starts
    the modes from û + dû/dφ·Δφ, as every later one does (:mod:`fedglmm.likelihood.restarts`)."""
    u = getattr(engine, "u", None)
    if u is None or getattr(engine, "_last", 0) is not None or modes.ndim != 2 or modes.shape[1] != u.shape[1]:
        return
    index = {str(lv): i for i, lv in enumerate(levels)}
    pos = [index.get(str(lv), -1) for lv in design.group_levels]
    if len(pos) != u.shape[0] or min(pos, default=-1) < 0:
        return
    engine.u = np.array(modes[pos], dtype=float)
    if slope is not None and transform is not None:
        engine._last = _carried(slope, pos, np.asarray(transform, float), zscale, engine, list(design.x_names))


def _carried(slope: tuple, pos: list, transform: np.ndarray, zscale, engine, x_names: list) -> tuple | None:
    """The own fit's (φ, dû/dφ) on the engine's internal scale (see :func:`warm_start`); None where the
    columns are not the same, the engine has no single Λ (``theta_r``) or the own transform is singular."""
    phi, dU, T_own, zs_own, names = slope
    rows = getattr(engine, "theta_r", None)
    if names != x_names or rows is None:
        return None
    p, k, q = transform.shape[0], len(rows), engine.u.shape[1]
    zs = np.asarray(zscale, float) if zscale is not None and len(zscale) else np.ones(q)
    zs_own = zs_own if len(zs_own) else np.ones(q)
    if T_own.shape != transform.shape or len(phi) != p + k or dU.shape[2] != p + k or len(zs) != len(zs_own):
        return None
    try:
        J = np.zeros((p + k, p + k))          # φ_own = J φ
        J[:p, :p] = np.linalg.solve(T_own, transform)
        J[p:, p:] = np.diag(zs_own[rows] / zs[rows])
        return np.linalg.solve(J, phi), dU[pos] @ J
    except np.linalg.LinAlgError:
        return None
