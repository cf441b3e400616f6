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


def points_asked(cands: list, extra, config, third_more: list) -> list[int]:
    """The candidates ``cands`` whose points come with the sites' third derivatives when the next round asks for
    them (:meth:`~fedglmm.likelihood.newton_end.Ending._third_wanted`): the caller's model's step ``extra`` where it
    is proposed (the candidate predicted to gain most otherwise), and Newton's beside it (``config.third_points``
    of them).  Far from the optimum the largest predicted gain is often the least founded (a trust region's step
    at four times Newton's reach, a step to third order), and the point accepted was the model's or Newton's: with
    the point predicted to gain most alone, the reference cases split one herd per site, cbpp_olre took 6 rounds
    (5), toenail over 10 sites 6 (5).  By quadrature too, where they come from the gradients of the point's Hessian
    and P(P - 1)/2 more: both points take grouseticks_gh5 over 3 sites 0.97 times as long as the first alone did by
    a seven-point stencil of P(P + 1) gradients (both so: 1.15 times), and sim_toenail_gh20 over 20 sites 4 rounds,
    not 5.  Where no other Newton step is beside the best, the candidate predicted to gain second most (with the
    steps in the SDs' squares, now with several factors too: cbpp_olre over 3 sites 5 -> 4 rounds,
    parity_multilevel.py's other 52 splits as before).  And the steps to third order from the current point, where
    they are candidates (``third_more``; ``config.third_steps``, the hybrid's): from a start 9.4 above the optimum
    (epil over 20 sites, from site totals: NewtonConfig.third_start) the one to third order reached 0.007 where
    Newton's reached 0.47, and with its third derivatives the next step to third order ended the fit (4 rounds, not
    5); sim_toenail_la over 20 sites 6 -> 5 (ending 3e-8 above the optimum, standard errors to 3e-10 with the
    Hessian's second-order change: last_step._second_order).  The iterative method's fits took 1183 -> 1165 rounds
    on benchmarks/rounds_heldout.py and 690 -> 682 on stress_methods.py with them, but contraception_probit over 3
    sites 1.2 times the time in as many rounds: not there."""
    if not cands:
        return [0]
    best = 0 if extra is not None and cands[0] is extra else int(np.argmax([c.pred for c in cands]))
    plain = [i for i, c in enumerate(cands) if c.newton and i != best]
    if not plain and len(cands) > 1:          # (none: the candidate predicted to gain second most)
        plain = [max((i for i in range(len(cands)) if i != best), key=lambda i: cands[i].pred)]
    out = ([best] + plain[:1])[:config.third_points]
    if not config.third_steps:
        return out
    return out + [i for i, c in enumerate(cands) if i not in out and any(c is m for m in third_more)]
