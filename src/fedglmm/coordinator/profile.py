"""Profile-likelihood intervals, federated: every endpoint of every interval found at once, a few rounds
in all.

The profile of a quantity h (:mod:`fedglmm.coordinator.profile_params`) is f_h(v) = min {f(x): h(x) = v},
f = −ℓ; an interval at level 1 − α is {v: 2(f_h(v) − f̂) ≤ z²}, z = Φ⁻¹(1 − α/2), lme4's signed root
deviance ζ(v) = ±sqrt(2(f_h(v) − f̂)) cut at ±z (Bates et al. 2015, J. Stat. Softw. 67(1), section 5.1).
Each endpoint solves the system of Venzon & Moolgavkar (1988, Appl. Statist. 37(1): 87-94)

    ∇f(x) − λ ∇h(x) = 0,    f(x) − f̂ − z²/2 = 0,

(x optimal given h(x), and on the cut), whose Newton step needs only f, ∇f and ∇²f at x: exactly what
the sites send for a point.  So one round carries, for every endpoint, a few trial steps along its Newton
direction (full, half, quarter), and the one that most reduces ‖residual‖ is kept; one more point is the
optimum itself, refined by Newton as it goes (for a REML fit the ML optimum: lme4 profiles the ML
deviance).  Starting from the Wald endpoints (the quadratic model at the estimate), the endpoints converge
quadratically: all intervals of a model in typically 4-8 rounds.

Endpoints at a boundary: a random-effect SD whose profile stays below the cut as it shrinks to zero has
lower bound 0; a correlation whose profile stays below the cut up to ±1 has that bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ..likelihood.fit import GLMM_KEYS, LMM_DERIVATIVE_KEYS, LMM_KEYS
from ..likelihood.lmm_shared import SUM_KEYS
from ..likelihood.setup import sum_replies
from ..protocol import request
from .profile_params import Layout, Quantity, lmm_objective, quantities
from .shared_glmm_rounds import FINAL_DEC, SharedGLMMEvaluator
from .shared_rounds import SharedRoundEvaluator

MAX_ROUNDS = 12
TOL_ZETA = 1e-4          # |ζ − z| at an accepted endpoint
TOL_STATIONARY = 1e-8    # the Lagrangian gradient's size in the metric of the Hessian at the optimum
FRACTIONS = (1.0, 0.5, 0.25)
CENTER_TOL = 1e-9        # the optimum's Newton decrement below which it is not refined further (f to ~1e-9)


@dataclass
class Point:
    x: np.ndarray
    lam: float
    f: float = np.nan
    g: np.ndarray | None = None
    H: np.ndarray | None = None


@dataclass
class Endpoint:
    """One end (``side`` −1 or +1) of one quantity's interval, solved by the Newton iteration above."""

    qty: Quantity
    side: int
    z: float
    h0: float                       # the quantity at the estimate
    se: float                       # its Wald SE (h scale), for capping steps
    cur: Point | None = None
    trials: list = field(default_factory=list)
    value: float | None = None      # the endpoint (h scale) once found; ±inf for a boundary
    steps: tuple = FRACTIONS

    @property
    def done(self) -> bool:
        return self.value is not None


def _merit(ep: Endpoint, pt: Point, fhat: float, Hinv: np.ndarray, L: Layout) -> float:
    if not (np.isfinite(pt.f) and np.all(np.isfinite(pt.g))):
        return np.inf
    if ep.side * (ep.qty.value(pt.x, L) - ep.h0) <= 0:
        return np.inf                # the other branch of the profile
    zeta = np.sqrt(2.0 * max(pt.f - fhat, 0.0))
    r = pt.g - pt.lam * ep.qty.grad(pt.x, L)
    return float((zeta - ep.z) ** 2 + r @ Hinv @ r)


def _newton(ep: Endpoint, pt: Point, fhat: float, L: Layout) -> tuple[np.ndarray, float]:
    """The Newton step (dx, dλ) of the endpoint's system at ``pt``, capped at two Wald half-widths in h."""
    gh, Hh = ep.qty.grad(pt.x, L), ep.qty.hess(pt.x, L)
    P = len(pt.x)
    J = np.zeros((P + 1, P + 1))
    J[:P, :P] = pt.H - pt.lam * Hh
    J[:P, P] = -gh
    J[P, :P] = pt.g
    F = np.r_[pt.g - pt.lam * gh, pt.f - fhat - 0.5 * ep.z ** 2]
    sol = np.linalg.lstsq(J, -F, rcond=1e-13)[0]
    dx, dlam = sol[:P], float(sol[P])
    dh = abs(gh @ dx)
    cap = 2.0 * ep.z * ep.se
    if dh > cap:
        dx, dlam = dx * cap / dh, dlam * cap / dh
    return dx, dlam


def _boundary(ep: Endpoint, pt: Point, fhat: float, L: Layout) -> bool:
    """An SD driven towards zero or a correlation towards ±1 without reaching the cut: a boundary end."""
    h = ep.qty.value(pt.x, L)
    below = 2.0 * (pt.f - fhat) < ep.z ** 2
    if ep.qty.kind == "sd" and ep.side < 0 and h < ep.h0 - 12.0 and below:
        ep.value = -np.inf
    elif ep.qty.kind == "cor" and abs(h) > 7.0 and below:
        ep.value = np.sign(h) * np.inf
    return ep.done


def _update(ep: Endpoint, evaluated: list[Point], fhat: float, Hinv, L: Layout) -> None:
    """Keep the best trial point, test for the end, and propose the next trials."""
    if not evaluated:
        return
    best = min(evaluated, key=lambda pt: _merit(ep, pt, fhat, Hinv, L))
    m_best = _merit(ep, best, fhat, Hinv, L)
    m_cur = _merit(ep, ep.cur, fhat, Hinv, L) if ep.cur is not None and ep.cur.g is not None else np.inf
    if m_best < m_cur:
        ep.cur, ep.steps = best, FRACTIONS
    else:
        ep.steps = tuple(s / 8.0 for s in ep.steps)     # no trial helped: shorter ones
    pt = ep.cur
    if pt is None or pt.g is None or not np.isfinite(m_best if m_best < m_cur else m_cur):
        ep.trials = []
        return
    zeta = np.sqrt(2.0 * max(pt.f - fhat, 0.0))
    r = pt.g - pt.lam * ep.qty.grad(pt.x, L)
    if abs(zeta - ep.z) < TOL_ZETA and r @ Hinv @ r < TOL_STATIONARY:
        ep.value = ep.qty.value(pt.x, L)
        ep.trials = []
        return
    if _boundary(ep, pt, fhat, L):
        ep.trials = []
        return
    dx, dlam = _newton(ep, pt, fhat, L)
    ep.trials = [Point(pt.x + a * dx, pt.lam + a * dlam) for a in ep.steps]


class Evaluator:
    """f, ∇f, ∇²f at many points in one round (one ``evaluate`` request)."""

    def __init__(self, session, layout: Layout):
        self.session, self.L = session, layout
        self.shared = None

    def __call__(self, points: list[np.ndarray]) -> list[tuple]:
        L, st = self.L, self.session.setup
        if L.gaussian:
            thetas = np.asarray([x[L.p:L.p + L.k] for x in points]).reshape(len(points), L.k)
            uniq, inv = np.unique(thetas, axis=0, return_inverse=True)
            sums = self._round(uniq, LMM_KEYS + (LMM_DERIVATIVE_KEYS if L.k else []))
            return [lmm_objective(x, sums[i], L) for x, i in zip(points, np.ravel(inv))]
        if st.shared:            # levels shared by sites: the coordinator's Laplace sums, v solved as in the fit
            if self.shared is None:
                self.shared = SharedGLMMEvaluator(st, self, settle=FINAL_DEC, patient=True)
            sums = self.shared.evaluate(list(points), GLMM_KEYS)
        else:
            sums = self._round(np.asarray(points), GLMM_KEYS)
        return [(-float(s["value"]), -np.asarray(s["grad"]), -np.asarray(s["hess"])) for s in sums]

    def evaluate(self, points, keys, extra=None) -> list[dict]:
        """One round at the points (b, β, θ) of a GLMM with shared levels (the interface of
        :class:`~fedglmm.coordinator.rounds.RoundEvaluator` that :class:`SharedGLMMEvaluator` uses)."""
        st = self.session.setup
        rep = self.session.broadcast(request("evaluate", points=np.asarray(points), **st.scale, **(extra or {})),
                                     "profile")
        return [self.shared.total({sid: r["points"][i] for sid, r in rep.items()}, keys) for i in range(len(points))]

    def _round(self, pts: np.ndarray, keys) -> list[dict]:
        st = self.session.setup
        msg = request("evaluate", points=pts, **st.scale)
        rep = self.session.broadcast(msg, "profile")
        per_point = [{sid: r["points"][i] for sid, r in rep.items()} for i in range(len(pts))]
        if st.shared:             # levels shared by sites: the pooled sums from the shared ones
            shared = SharedRoundEvaluator(st, self.session.options.reml)
            return [shared.pool.pooled_sums(shared.total(pp, SUM_KEYS), x) for pp, x in zip(per_point, pts)]
        return [sum_replies(pp, keys) for pp in per_point]


def _start(session, L: Layout):
    """The estimate in profiling coordinates, f there, and the Hessian (from the fit's last sums)."""
    est = session.estimate
    if L.gaussian:
        final = {sid: r for sid, r in est.final.items() if not session.setup.shared or "A" in r}
        s = sum_replies(final, LMM_KEYS + (LMM_DERIVATIVE_KEYS if L.k else []))
        x = np.r_[est.gamma, est.theta, 0.5 * np.log(est.sigma2)]
        f, _, H = lmm_objective(x, s, L)
        return x, f, H
    return np.r_[est.gamma, est.theta, est.disp], -float(est.loglik), np.asarray(est.info, float)


def _center_step(center: Point) -> list[np.ndarray]:
    """Newton trials for the optimum (it is refined while the endpoints converge)."""
    try:
        dx = -np.linalg.solve(center.H, center.g)
    except np.linalg.LinAlgError:
        return []
    if not np.all(np.isfinite(dx)) or -(center.g @ dx) < CENTER_TOL:
        return []
    return [center.x + dx, center.x + 0.5 * dx]


ZERO_SD = 1e-4          # a relative-factor row shorter than this is an SD at zero (a boundary estimate)


def _zero_rows(x, L: Layout) -> set:
    return {r for r in set(L.rows.tolist()) if np.linalg.norm(x[L.p + np.flatnonzero(L.rows == r)]) < ZERO_SD}


def _endpoints(q: Quantity, x0, Hinv, z: float, L: Layout) -> list[Endpoint]:
    """Both ends of a quantity's interval, each started at its Wald end (for an SD estimated at zero: the
    lower end is 0, the upper one starts at the Wald end of the SD itself)."""
    zero = _zero_rows(x0, L)
    h0 = q.value(x0, L)
    if q.kind == "cor" and zero & set(q.index):
        return [Endpoint(q, s, z, h0, 1.0, value=np.nan) for s in (-1, 1)]
    if q.kind == "sd" and q.index[0] in zero:
        d = L.p + int(np.flatnonzero((L.rows == q.index[0]) & (L.cols == q.index[0]))[0])
        sd_d = np.sqrt(Hinv[d, d])
        step = (z / sd_d) * Hinv[:, d]
        x = x0 + step
        lam = (z / sd_d) * x[d]          # ∇f ≈ (z/sd) e_d and ∇h ≈ e_d / θ_d there
        return [Endpoint(q, -1, z, h0, 1.0, value=-np.inf),
                Endpoint(q, 1, z, h0, 1.0, trials=[Point(x, lam)])]
    gh = q.grad(x0, L)
    se = np.sqrt(max(float(gh @ Hinv @ gh), 1e-300))
    return [Endpoint(q, side, z, h0, se, trials=[Point(x0 + (side * z / se) * (Hinv @ gh), side * z / se)])
            for side in (-1, 1)]


def profile(session, level: float = 0.95, max_rounds: int = MAX_ROUNDS) -> tuple[dict, dict]:
    """Every quantity's profile interval at ``level``: ``({name: (lower, upper)}, info)`` on the quantities'
    own scales; ``info`` has the rounds used and the endpoints not found (NaN)."""
    L, qtys = quantities(session.setup, session.spec.group, session.gaussian)
    x0, f0, H0 = _start(session, L)
    Hinv = np.linalg.pinv(H0, hermitian=True)
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    center, fhat = Point(x0, 0.0, f0), f0
    center_trials = [x0]
    eps = [ep for q in qtys for ep in _endpoints(q, x0, Hinv, z, L)]
    rounds = 0
    while rounds < max_rounds and (any(not e.done for e in eps) or center_trials):
        pts = center_trials + [p.x for e in eps if not e.done for p in e.trials]
        if not pts:
            break
        results = Evaluator(session, L)(pts)
        rounds += 1
        cres, rest = results[:len(center_trials)], results[len(center_trials):]
        improved = False
        for x, (f, g, H) in zip(center_trials, cres):
            if np.isfinite(f) and (center.g is None or f < center.f):
                center, improved = Point(x, 0.0, f, g, H), True
        fhat = min(fhat, center.f) if center.g is not None else fhat
        center_trials = _center_step(center) if center.g is not None and improved else []
        k = 0
        for e in eps:
            if e.done:
                continue
            n = len(e.trials)
            evaluated = [Point(p.x, p.lam, *rest[k + i]) for i, p in enumerate(e.trials)]
            k += n
            _update(e, evaluated, fhat, Hinv, L)
    out, missing = {}, []
    for q in qtys:
        lo, hi = (next(e for e in eps if e.qty is q and e.side == s) for s in (-1, 1))
        vals = []
        for e in (lo, hi):
            if e.value is None or np.isnan(e.value):
                what = "undefined at a zero SD" if e.value is not None else "not found"
                missing.append(f"{q.name} ({'lower' if e.side < 0 else 'upper'}, {what})")
                vals.append(np.nan)
            else:
                vals.append(q.original(e.value) if np.isfinite(e.value) else
                            (0.0 if q.kind == "sd" else float(np.sign(e.value))))
        out[q.name] = tuple(vals)
    return out, {"rounds": rounds, "not_found": missing, "deviance": 2.0 * fhat}
