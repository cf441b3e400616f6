"""The third derivatives of a site's own fit, sent beside it for the hybrid's start and step model
(:mod:`fedglmm.site.own_fit`): differences of the engine's analytic Hessian, half a standard error apart;
and those at a point the coordinator names -- a final one, or one of a round's -- where it asks for them
(:func:`reply_third`)."""
from __future__ import annotations

import numpy as np

from ..likelihood.linalg import pack_third, symmetric_third

THIRD_STEP = 0.5      # the differences for the third derivatives: half a standard error each way, but 1e-3
FLAT_SE = 1e3         # along a coordinate whose standard error is above this (a negative binomial's ψ at its
                      # poisson limit: 1e6, whose steps overflowed ϑ and took the modes 10 s to fail)
POINT_STEP = 1e-4     # ... at a point the coordinator names: this far (internal scale, relative beyond 1) ...
FINAL_STEP = 1e-5     # ... at a final point, from an analytic Hessian (see reply_third)
QUARTIC_STEP = 1e-3    # the second difference of the Hessian along a final request's ``quartic`` (_reply_quartic)


def third_derivatives(engine, x: np.ndarray, info: np.ndarray) -> np.ndarray | None:
    """The third derivatives of −ℓ at ``x`` (the engine's internal scale), from central differences of its
    analytic Hessian half a standard error either side in each coordinate (2P evaluations from
    warm modes), made symmetric; None if an evaluation fails.  Over that range they stand for the change of
    curvature that a quadratic summary of the fit misses (the skew of a variance's likelihood above all)."""
    try:
        se = np.sqrt(np.maximum(np.diag(np.linalg.inv(info)), 0.0))
    except np.linalg.LinAlgError:
        return None
    P = len(x)
    D = np.empty((P, P, P))
    for k in range(P):
        h = THIRD_STEP * se[k] if 0 < se[k] <= FLAT_SE else 1e-3
        e = np.zeros(P)
        e[k] = h
        hp, hm = engine.sums(x + e)["hess"], engine.sums(x - e)["hess"]
        D[:, :, k] = -(np.asarray(hp) - np.asarray(hm)) / (2.0 * h)
    if not np.all(np.isfinite(D)):
        return None
    return symmetric_third(D)


def covariance_third(engine, x: np.ndarray, H: np.ndarray, idx) -> np.ndarray | None:
    """The third derivatives of −ℓ at ``x`` (internal scale; ``H`` its Hessian there) with an index among the
    positions ``idx`` (covariance parameters; T[a, b, c] from the slice of its last index there), by forward
    differences of the analytic Hessian half a standard error along each (len(idx) evaluations); the others 0.
    A likelihood's skew with few levels is in their variances: the full derivatives (2·len(x) evaluations)
    started the 3-site splits of parity_multilevel.py no closer (coordinator.own_combination.factor_log_start)."""
    se = np.sqrt(np.maximum(np.diag(np.linalg.pinv(H)), 0.0))
    T = _spread(_forward(engine, x, H, idx, np.where((se > 0) & (se <= FLAT_SE), THIRD_STEP * se, 1e-3)), idx)
    return symmetric_third(T) if len(idx) and np.all(np.isfinite(T)) else None


def reply_third(engine, x: np.ndarray, req: dict, reply: dict, index: int | None = None) -> dict:
    """A ``finalize`` request that asks for them (``third``), or an ``evaluate`` request that asks for them at its
    point ``index`` (``third_at``), gets the third derivatives of ℓ at the point in ``reply`` (``third``;
    ``reply``, the sums at ``x``, is returned): forward differences of the engine's analytic Hessian, 1e-4 in
    each coordinate (internal scale; relative beyond 1) -- at a final point 1e-5, where they move the information
    to the estimate: standard errors 8.6e-9 from the fit continued to machine precision where 1e-4 left 2.1e-8
    (sim_toenail_la over 5 sites of unequal size), 8e-11 where it left 1e-9 (sim_rare_la over 2) --, P evaluations
    from warm modes (several grouping factors at a round's point: along the covariance parameters, below), made
    symmetric, its P(P + 1)(P + 2)/6 distinct entries (:func:`~fedglmm.likelihood.linalg.pack_third`) -- sums over
    the site's rows, as the Hessian is.  The coordinator takes its last step to third order with them instead of one
    more round (:meth:`~fedglmm.likelihood.newton_end.Ending._third_last`), or a step near the optimum whose error is of
    fourth order (:meth:`~fedglmm.likelihood.newton_end.Ending._third_final`).  By quadrature, and with several
    grouping factors at a final point, from the gradients alone: those of its Hessian and P(P - 1)/2 more
    (:func:`_stencil_third`).
    Under secure aggregation they leave masked with the other sums (every float of a reply is masked): a site
    that could not make them sends NaNs in their place, so that every site's reply has the same fields and the
    total is NaN there (the coordinator then goes on without them, as where a plain site sent none)."""
    wanted = req.get("third") if index is None else index in req.get("third_at", ())
    if not wanted or "hess" not in reply:
        return reply
    quartic = index is None and req.get("quartic") is not None
    if "secagg" in req:
        P = len(x)
        reply = _reply_third(engine, x, req, reply, index)
        reply = _reply_quartic(engine, x, req, reply) if quartic else reply
        reply.setdefault("third", np.full(P * (P + 1) * (P + 2) // 6, np.nan))
        if quartic:
            reply.setdefault("quartic", np.full((P, P), np.nan))
        return reply
    reply = _reply_third(engine, x, req, reply, index)
    return _reply_quartic(engine, x, req, reply) if quartic else reply


def _reply_quartic(engine, x: np.ndarray, req: dict, reply: dict) -> dict:
    """A final request's ``quartic`` v (the way the coordinator predicts its last step to go, |v|∞ = 1) gets
    ``quartic``: ℓ's fourth derivatives along it, Q[v, v] = (H(x + hv) − 2H(x) + H(x − hv)) / h², h =
    QUARTIC_STEP -- two Hessians more, a P × P sum over the site's rows as the Hessian is (one grouping factor;
    by quadrature each a difference of gradients, whose error 1e-3 apart stays far below Q's).  The coordinator
    moves the information to the estimate with them over the last step's part along v
    (:func:`~fedglmm.likelihood.last_step._second_order`)."""
    v = np.asarray(req["quartic"], float)
    if getattr(engine, "third_hessian", None) is not None or v.shape != x.shape or not np.all(np.isfinite(v)):
        return reply
    try:
        up, down = (np.asarray(engine.sums(x + a * QUARTIC_STEP * v)["hess"], float) for a in (1.0, -1.0))
    except (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError, ValueError):
        return reply
    Q = (up - 2.0 * np.asarray(reply["hess"], float) + down) / QUARTIC_STEP ** 2
    if np.all(np.isfinite(Q)):
        reply["quartic"] = 0.5 * (Q + Q.T)
    return reply


def _reply_third(engine, x: np.ndarray, req: dict, reply: dict, index: int | None) -> dict:
    """:func:`reply_third`'s work: ``reply`` with ``third`` where they could be made."""
    cov = index is not None and bool(req.get("third_cov"))
    own = getattr(engine, "third_hessian", None)
    quadrature = getattr(engine, "nagq", 1) > 1 and getattr(engine, "q", 0)
    if quadrature or (own is not None and index is None):
        # (several grouping factors at a final point, whose Hessian is a central difference of the analytic gradient:
        # from those gradients as by quadrature and P(P - 1)/2 more, where P polished Hessians took P² -- split over 3
        # sites grouseticks_nested took 0.57 -> 0.47 s, grouseticks_olre 1.08 -> 0.84 s, for the same standard errors;
        # cheap enough for fits of 9-24 parameters too: likelihood.fit._newton_config)
        T = _stencil_third(engine, x, range(engine.p, len(x)) if cov else None)
        if T is not None:
            reply["third"] = pack_third(T)
            return reply
        if quadrature:
            return reply
    P = len(x)
    # an engine whose Hessian is a difference of gradients (several grouping factors) has one fit for differencing
    # (third_hessian), P gradients each: there the entries with an index among the covariance parameters alone,
    # where the likelihood is furthest from quadratic (grouseticks' nested factors over 3 sites: the same rounds
    # as with all of them, standard errors 3e-7 from the exact ones instead of 9e-8, fit time 1.32 -> 1.16 that
    # of the fit before third derivatives were asked for at a round's points)
    at = (lambda y: -np.asarray(own(y), float)) if own is not None else None     # noqa: E731
    H = at(x) if at is not None else -np.asarray(reply["hess"], float)
    # ``third_cov`` (at a round's points): the entries with an index among the covariance parameters alone, as
    # there -- len(θ, ψ) Hessians instead of P (the hybrid's starts: NewtonConfig.third_start_cov)
    # (at a final point every entry, here where no gradients of its Hessian were kept: they move the information to
    # the estimate, whose fixed effects' own third derivatives count too -- benchmarks/parity_multilevel.py --sites 3:
    # standard errors above 1e-8 from the pooled fit's in 8 of 53 splits with those along the covariance parameters
    # alone, 2 with all of them)
    idx = range(engine.p, P) if (own is not None and index is not None) or cov else range(P)
    step = FINAL_STEP if index is None and own is None else POINT_STEP
    D = -_spread(_forward(engine, x, H, idx, step * np.maximum(1.0, np.abs(x)), at), idx)
    if np.all(np.isfinite(D)):
        reply["third"] = pack_third(symmetric_third(D))
    return reply


def _spread(D: np.ndarray, idx) -> np.ndarray:
    """Slices D[:, :, t] for t in ``idx`` spread to every entry with an index among ``idx`` (the others 0)."""
    on = np.isin(np.arange(D.shape[0]), list(idx))
    if on.all():
        return D
    a, b, c = on[:, None, None], on[None, :, None], on[None, None, :]
    return np.where(c, D, np.where(b, np.einsum("acb->abc", D), np.where(a, np.einsum("bca->abc", D), 0.0)))


def _forward(engine, x: np.ndarray, H: np.ndarray, idx, steps: np.ndarray, at=None) -> np.ndarray:
    """D[:, :, t] for t in ``idx``: forward differences of −ℓ's Hessian (``H`` at ``x``; elsewhere ``at(y)``,
    by default the engine's sums) ``steps[t]`` along coordinate t (one evaluation each); the other slices 0."""
    P = len(x)
    at = at or (lambda y: -np.asarray(engine.sums(y)["hess"]))       # noqa: E731
    D = np.zeros((P, P, P))
    for t in idx:
        h = steps[t]
        D[:, :, t] = (at(x + h * np.eye(P)[t]) - H) / h
    return D


def _stencil_third(engine, x: np.ndarray, idx=None) -> np.ndarray | None:
    """ℓ's third derivatives at a point by quadrature (or at a multi-level engine's final point), from the gradients its
    Hessian was differenced from (the engine's ``stencil`` at ``x``, 1e-5 apart relative to 1 + |x|:
    :func:`~fedglmm.likelihood.quadrature.gradient_hessian`): T[:, a, a] by their central second difference, T[:, a, b]
    by the forward mixed one, one gradient more each at x + h_a e_a + h_b e_b -- P(P − 1)/2 gradients where a
    seven-point stencil 1e-3 apart took P(P + 1), of first order in h but at a hundredth of its step.  They move the
    information to the estimate over a last step of 1e-4 or less: on the held-out fits of nAGQ 20 over 2-5 sites (epil,
    toenail, simulated rare events) the standard errors came within 2.9e-9 of the fit continued to machine precision
    (the seven-point stencil at 1e-3: 5.6e-9; a forward one at 1e-3: 2.5e-7; the secant of the step before, without
    them: 5.8e-6).  At a round's points, for a step to third order from decrements of 1e-3 to 0.3, their error (1.3e-5
    of the largest entry on cbpp) is far below the step's own, of fourth order.  None where no Hessian was evaluated at
    x (the sums there failed) or a gradient cannot be computed.  ``idx``: the entries with an index among these alone
    (the others 0), from the gradients at x + h_a e_a + h_b e_b with a or b among them."""
    st = getattr(engine, "stencil", None)
    if st is None or st.phi.shape != x.shape or not np.array_equal(st.phi, x):
        return None
    P, h, g0 = len(x), st.h, st.g0
    on = np.ones(P, bool) if idx is None else np.isin(np.arange(P), list(idx))
    D = np.zeros((P, P, P))
    try:
        for a in range(P):
            D[:, a, a] = (st.up[a] - 2.0 * g0 + st.down[a]) / h[a] ** 2
            for b in (b for b in range(a + 1, P) if on[a] or on[b]):
                d = np.zeros(P)
                d[a], d[b] = h[a], h[b]
                g = st.grad(engine, d)
                D[:, a, b] = D[:, b, a] = (g - st.up[a] - st.up[b] + g0) / (h[a] * h[b])
    except (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError, ValueError):   # (none sent)
        return None
    D = D if on.all() else _spread(D, np.flatnonzero(on))
    return symmetric_third(D) if np.all(np.isfinite(D)) else None
