"""The sites' third derivatives in a GLMM fit's rounds: asked for where the optimiser
(:class:`~fedglmm.likelihood.newton.TrustRegionNewton`) wants them (``want_third``) and the evaluator may send
them (``third_final``: the coordinator's rounds, masked under secure aggregation), and handed to it summed --
at a final point (``final_third``: the last step to third order) or at a point of a round (``point_third``:
a step near the optimum to third order)."""
from __future__ import annotations

import numpy as np

from .linalg import unpack_third


def finalize_round(evaluator, x, opt, keys: list):
    """The final round's sums at ``x`` and the parts' replies -- with the sites' third derivatives there, for
    the optimiser's last step (``opt.final_third``), where it asks for them and the evaluator may send them."""
    ask = bool(getattr(opt, "want_third", False)) and bool(getattr(evaluator, "third_final", False))
    v = getattr(opt, "final_direction", None) if ask else None
    v = v / np.max(np.abs(v)) if v is not None and np.max(np.abs(v)) > 0 and np.all(np.isfinite(v)) else None
    extra = {"third": True, **({"quartic": v} if v is not None else {})}
    s, parts = evaluator.finalize(x, keys, extra if ask else None)
    opt.final_third = _summed_third(parts, len(x)) if ask else s.get("third")     # (or the evaluator's own)
    opt.final_quartic = _summed_quartic(parts, v)
    return s, parts


def evaluate_round(evaluator, xs, opt, keys: list) -> list:
    """A round's sums at ``xs`` -- with the sites' third derivatives at some of them (``opt.third_points``; in
    ``opt.point_third``, None at the others), where the optimiser asks for them and the evaluator may send them
    (P Hessians a point at each site, by quadrature P(P - 1)/2 gradients beside its Hessian's: at the caller's
    model's step and Newton's, the hybrid's steps to third order, the first round's starts where groups' summaries
    stayed at their sites: ``Ending._third_points``, NewtonConfig.third_start; with ``opt.third_cov``, those along
    the covariance parameters alone, NewtonConfig.third_start_cov)."""
    ask = bool(getattr(opt, "want_third", False)) and bool(getattr(evaluator, "third_final", False))
    at = [int(i) for i in getattr(opt, "third_points", [0])]
    extra = {"third_at": at, **({"third_cov": True} if getattr(opt, "third_cov", False) else {})}
    sums = evaluator.evaluate(xs, keys, extra) if ask else evaluator.evaluate(xs, keys)
    opt.point_third = [_summed_third({"": s}, len(x)) if i in at else None
                       for i, (s, x) in enumerate(zip(sums, xs))] if ask else None
    return sums


def _summed_quartic(parts, v) -> tuple | None:
    """(v, Q[v, v]): the fourth derivatives of −ℓ along the direction v from the parts' replies (each its
    ``quartic``, of its ℓ), or None where v was not sent or a part sent none."""
    if v is None:
        return None
    try:
        Q = -sum(np.asarray(r["quartic"], float) for r in parts.values())
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    return (v, Q) if np.shape(Q) == (len(v), len(v)) and np.all(np.isfinite(Q)) else None


def _summed_third(parts, n: int) -> np.ndarray | None:
    """The third derivatives of −ℓ at a point from the parts' replies (each its ``third``: of its ℓ, packed), or
    None where a part sent none (a site with shared levels, or one that could not make them)."""
    try:
        T = unpack_third(-sum(np.asarray(r["third"], float) for r in parts.values()), n)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    return T if T is not None and np.all(np.isfinite(T)) else None
