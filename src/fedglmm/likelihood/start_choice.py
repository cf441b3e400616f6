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


def best_start(pts, finite) -> int:
    """The start to go on from: the lowest among those with a sound Newton step (H positive definite), unless
    one without is lower than that one's value less its decrement (taken as at most 2: beyond, its quadratic
    model says little of where its step lands)."""
    best = min(finite, key=lambda i: pts[i][1])
    steps = {i: newton_step(pts[i][2], pts[i][3]) for i in finite}
    pd = [i for i in finite if steps[i] is not None]
    if not pd or best in pd:
        return best
    sound = min(pd, key=lambda i: pts[i][1])
    dec = -(pts[sound][2] @ steps[sound])
    return best if pts[best][1] < pts[sound][1] - min(dec, 2.0) else sound
