"""The hybrid's step model: the pseudo-data log-likelihood, corrected to agree with the sites' exact
gradient and Hessian at the current point, minimised locally (no round) to propose the next point."""
from __future__ import annotations

import numpy as np

from ..likelihood.candidates import MODEL_REACH, scaled_norm
from ..likelihood.fused import parallel_map, threads_pay
from ..likelihood.newton import TrustRegionNewton
from ..likelihood.start_choice import newton_step
from ..model.options import NewtonConfig
from .virtual import part_engines


def surrogate_model(surrogate, tail: bool = False):
    """A model step for :class:`TrustRegionNewton` from a local stand-in for the objective.

    ``surrogate(x) -> (f, g, H)`` approximates F (here −ℓ of pseudo-data with the sites' moments, computed
    at the coordinator at no round's cost).  At the current point x_k, where the sites gave the exact
    (g, H), the model is the surrogate corrected to agree with F to second order,

        S(x) = P(x) + (g − g_P(x_k))ᵀ(x − x_k) + ½ (x − x_k)ᵀ(H − H_P(x_k))(x − x_k),

    and its minimiser is the step (found locally by trust-region Newton on S).  Where P's third and
    higher derivatives resemble F's, this step lands closer to F's minimiser than the Newton step does --
    the idea of the communication-efficient surrogate likelihood (Jordan, Lee & Yang 2019, JASA 114:668),
    with pseudo-data in place of one site's own rows.  The difference F − P has third derivatives too (from
    groups the pseudo-data lack, above all): the change of its Hessian between the nearest other point the
    sites evaluated and x_k gives them along that direction, added to S as a cubic term.  ``tail``: the last entry
    is a negative binomial's ψ, and the search on S steps in e^(−ψ) as the iteration does (steps.tail_step;
    benchmarks/nb_poisson_limit.py: one fit of 40 a round fewer, none more)."""
    P = _cached(surrogate)
    seen = []                    # points the sites evaluated: (x, H)
    last = {}                    # the point the model was last asked at, and F − P's Hessian there

    def observe(x, f, g, H):
        seen.append((np.array(x, float), np.array(H, float)))
        del seen[:-8]

    def model(x, f, g, H):
        try:
            fp, gp, Hp = P(x)
            dg, dH = g - gp, H - Hp
            # the difference F − P along the path: its Hessian changed by M over the last move d, a
            # secant estimate of its third derivative in that direction, kept as the cubic
            # C(s) = (sᵀMs)(uᵀs)/6 with u = d/dᵀd (exact for s ∥ d; zero with its derivatives at s = 0)
            M = u = None
            w = np.abs(np.diag(H))
            if "x" in last and np.any(last["x"] != x):         # along the path: from the last point
                y, dHy = last["x"], last["dH"]
            else:                                             # first round: the nearest other start
                others = [(float(((y - x) ** 2) @ w), y, Hy) for y, Hy in seen if np.any(y != x)]
                y, dHy = (None, None) if not others else (lambda t: (t[1], t[2] - P(t[1])[2]))(
                    min(others, key=lambda t: t[0]))
            if y is not None:
                d = x - y
                M, u = dH - dHy, d / (d @ d)
                M = (M + M.T) / 2
            last.update(x=np.array(x, float), dH=dH)

            def S(z):
                fz, gz, Hz = P(z)
                s = z - x
                val, grad, hess = fz + dg @ s + 0.5 * s @ dH @ s, gz + dg + dH @ s, Hz + dH
                if M is not None:
                    Ms, us = M @ s, u @ s
                    val += (s @ Ms) * us / 6.0
                    grad = grad + Ms * us / 3.0 + (s @ Ms) * u / 6.0
                    hess = hess + (M * us + np.outer(Ms, u) + np.outer(u, Ms)) / 3.0
                return val, grad, hess

            within = _within_reach(x, g, H, S)
            inner = TrustRegionNewton(x, NewtonConfig(tol=1e-10, near=1e-4, max_evals=8).local,
                                      tails=(len(x) - 1,) if tail else ())
            pts = inner.starts
            while pts:
                pts = inner.tell(pts, [within(z) for z in pts])
            if inner.current is None:       # the stand-in is not finite here (e.g. pseudo-data off its support)
                return None
            z = inner.solution if inner.converged else inner.current.x
            return z - x, fp - S(z)[0]
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            return None

    def hessian_change(x, y):
        """The surrogate's Hessian at y less that at x: its third derivatives along the move."""
        try:
            return P(y)[2] - P(x)[2]
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            return None

    model.observe = observe
    model.hessian_change = hessian_change
    return model


def _within_reach(x, g, H, S):
    """S where a step from x is at most ``MODEL_REACH`` times the Newton step's length (scaled by √|diag H|),
    the longest step the caller keeps (:meth:`~fedglmm.likelihood.newton.TrustRegionNewton._model_step`);
    beyond, a point that counts as not finite, so the search steps shorter.  The secant cubic can make S
    unbounded below there: on stress_methods seed 3 fit 35 the unbounded search ran S to −2.9e8."""
    newton = newton_step(g, H)
    reach = MODEL_REACH * scaled_norm(newton, H) if newton is not None else np.inf
    far = (np.inf, np.full(len(x), np.nan), np.full((len(x), len(x)), np.nan))
    return lambda z: S(z) if scaled_norm(z - x, H) <= reach else far


def _cached(surrogate):
    """``surrogate`` remembering its last 64 points (the step model asks for the same points repeatedly)."""
    cache = {}

    def P(x):
        key = np.asarray(x, float).tobytes()
        if key not in cache:
            cache.clear() if len(cache) > 64 else None
            cache[key] = surrogate(x)
        return cache[key]

    return P


def pseudo_objective(parts: dict, st, skip=()):
    """−ℓ of the pseudo-data (value, gradient, Hessian) on the fit's internal scale, computed by the
    coordinator from the stand-ins of the one-shot fit (:mod:`fedglmm.coordinator.virtual`; but those in
    ``skip``)."""
    first = next(iter(parts.values()), None)
    if first is None or first.design is None:                     # gaussian stand-ins: no surrogate needed
        engines = [part.engines.get(st.A, st.zs) for sid, part in parts.items() if sid not in skip]
    else:
        engines = list(part_engines(parts, st, skip)[0].values())

    def objective(x):
        evs = parallel_map(lambda eng: eng.evaluate(np.asarray(x, float), hess=True), engines, threads_pay(engines))
        return (-sum(ev.value for ev in evs), -sum(ev.grad for ev in evs), -sum(ev.hess for ev in evs))

    # evaluated by the compiled kernel, without the interpreter lock: several such objectives pay in threads
    objective.nogil = bool(engines) and all(getattr(eng, "kernel", False) for eng in engines)
    return objective if engines else None
