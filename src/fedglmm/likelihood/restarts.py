"""Where an engine's evaluation starts its modes, and what it does when a point cannot be evaluated.

The modes start from the last point's, moved to first order along the step (û + dû/dφ·Δφ, from the
implicit-function derivative the last evaluation computed; only for a move under 5 SD, beyond which the
linearisation is not to be trusted); then from the last point's modes; then -- the last point's modes can
be far off scale for this θ, and exp(η) overflows -- from zero.  A point that fails from every start
(non-finite value, gradient or Hessian, a singular curvature) leaves the engine as it was, and the
caller replies NaN: the coordinator's optimiser rejects the point and steps shorter.
"""
from __future__ import annotations

import numpy as np


def evaluate(lik, phi: np.ndarray, attempt):
    """``attempt()`` (an evaluation from the modes in ``lik.u``) from each start in turn: its result, or
    None if every start fails (``lik.u`` and ``lik._last`` then restored)."""
    u_prev, last = (None if lik.u is None else np.array(lik.u, copy=True)), lik._last
    starts = [u_prev] if u_prev is not None and np.any(u_prev) else []
    if last is not None and starts and last[0].shape == phi.shape:
        du = last[1] @ (phi - last[0])
        if np.all(np.abs(du) < 5.0):
            starts.insert(0, u_prev + du)
    for start in starts + [np.zeros((lik.G, lik.q))]:
        lik.u = np.array(start, copy=True)
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                ev = attempt()
            ok = np.isfinite(ev.value) and np.all(np.isfinite(ev.grad)) and \
                (ev.hess is None or np.all(np.isfinite(ev.hess)))
        except (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError):
            ok = False
        if ok:
            return ev
    lik.u, lik._last = u_prev, last
    return None
