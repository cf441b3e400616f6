"""The coordinator's optimiser: a trust-region Newton method driven one evaluation (one round) at a time.

It minimises F from the value, gradient and Hessian that the sites' sums provide at each point it asks
for.  The interface is ask/tell so that the caller owns the communication:

    opt = TrustRegionNewton(x0)
    x = opt.x0
    while x is not None:
        f, g, H = <one round at x>
        x = opt.tell(x, f, g, H)
    opt.solution, opt.converged

The step solves min gᵀs + ½ sᵀHs subject to ‖Ds‖ ≤ Δ, with D = sqrt|diag H| (so Δ is in units of
approximate standard errors), through an eigen-decomposition of the small P×P Hessian; a step is
accepted when the actual decrease is a fair share of the predicted one (Moré & Sorensen 1983; Nocedal &
Wright 2006, Alg. 4.1).  Convergence: once the Newton decrement gᵀH⁻¹g at an accepted point with a
positive-definite Hessian falls below ``near``, the full Newton step is proposed as the *final candidate*
(``opt.final_candidate`` is True, so the caller can ask for everything it wants at the end in that same
round); if the decrement there is below ``tol`` the iteration stops there, otherwise it goes on.  The
solution is that last evaluated point plus its own Newton step (``solution``; ``point`` is the evaluated
point): with quadratic convergence its error is of the order of the squared decrement, ~1e-16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class NewtonConfig:
    """Immutable settings of the optimiser."""

    tol: float = 1e-7           # Newton decrement gᵀH⁻¹g at which the final candidate is accepted
    near: float = 1e-3          # decrement below which the next (Newton) point is the final candidate
    max_evals: int = 60         # evaluations (rounds) at most
    radius0: float = 3.0        # initial trust radius (scaled units) when the Hessian is indefinite
    accept: float = 1e-4        # least ratio of actual to predicted decrease for accepting a step


@dataclass
class _State:
    x: np.ndarray
    f: float
    g: np.ndarray
    H: np.ndarray


@dataclass
class TrustRegionNewton:
    x0: np.ndarray
    config: NewtonConfig = field(default_factory=NewtonConfig)
    evals: int = 0
    converged: bool = False
    solution: np.ndarray | None = None
    message: str = ""
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.x0 = np.asarray(self.x0, float)
        self.final_candidate = False
        self._cur: _State | None = None
        self._radius: float | None = None
        self._pred = 0.0
        self._step_norm = 0.0

    @property
    def current(self) -> _State | None:
        return self._cur

    def tell(self, x, f, g, H) -> np.ndarray | None:
        """Record an evaluation at x; return the next point to evaluate, or None when finished."""
        self.evals += 1
        x, g, H = np.asarray(x, float), np.asarray(g, float), np.asarray(H, float)
        ok = np.isfinite(f) and np.all(np.isfinite(g)) and np.all(np.isfinite(H))
        if self._cur is None:
            if not ok:
                self.message = "the objective is not finite at the starting values"
                return None
            self._cur = _State(x, float(f), g, H)
        else:
            ared = self._cur.f - f if ok else -np.inf
            rho = ared / self._pred if self._pred > 0 else -np.inf
            if ok and rho >= self.config.accept:
                self._cur = _State(x, float(f), g, H)
                if rho > 0.75 and self._step_norm > 0.99 * self._radius:
                    self._radius = 2.0 * self._radius
                elif rho < 0.25:
                    self._radius = 0.5 * self._step_norm
            else:
                self._radius = 0.25 * self._step_norm
                if self._pred < 1e-13 * max(1.0, abs(self._cur.f)):
                    # the model predicts no measurable gain: the current point is as good as it gets
                    return self._finish(converged=True)
        self.history.append((self.evals, float(f) if ok else np.nan))
        cur = self._cur
        newton = _newton_step(cur.g, cur.H)
        dec = -(cur.g @ newton) if newton is not None else np.inf
        if dec < self.config.tol and self.final_candidate and self._cur.x is x:
            return self._finish(converged=True)
        if self.evals >= self.config.max_evals:
            self.message = f"no convergence within {self.config.max_evals} evaluations"
            return self._finish(converged=False)
        self.final_candidate = dec < self.config.near
        if self.final_candidate:
            self._pred, self._step_norm = dec / 2.0, 0.0
            return cur.x + newton
        s, pred, snorm = self._step(cur.g, cur.H, newton)
        self._pred, self._step_norm = pred, snorm
        return cur.x + s

    def _finish(self, converged: bool):
        self.point = self._cur.x
        step = _newton_step(self._cur.g, self._cur.H) if converged else None
        self.solution = self.point + (step if step is not None else 0.0)
        self.converged = converged
        if converged and not self.message:
            self.message = "converged"
        return None

    def _step(self, g, H, newton):
        d = np.sqrt(np.maximum(np.abs(np.diag(H)), 1e-12 * max(1.0, np.max(np.abs(np.diag(H))))))
        if newton is not None:
            nn = float(np.linalg.norm(d * newton))
            if self._radius is None:
                self._radius = max(nn, self.config.radius0)
            if nn <= self._radius:
                return newton, -(g @ newton + 0.5 * newton @ H @ newton), nn
        if self._radius is None:
            self._radius = self.config.radius0
        gs, Hs = g / d, H / np.outer(d, d)
        y = _trust_region_subproblem(gs, Hs, self._radius)
        s = y / d
        return s, -(g @ s + 0.5 * s @ H @ s), float(np.linalg.norm(y))


def _newton_step(g, H):
    """−H⁻¹g if H is positive definite, else None."""
    try:
        c = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return None
    return -np.linalg.solve(c.T, np.linalg.solve(c, g))


def _trust_region_subproblem(g, H, radius):
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
