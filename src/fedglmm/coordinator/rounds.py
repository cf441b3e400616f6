"""The coordinator's rounds: the requests it broadcasts (describe, setup, evaluate, finalize) and the
Newton iteration driven over them.

A round is one request to every site and one reply from each, through a transport
(:mod:`fedglmm.transport`); the sums of the replies feed the iteration of :mod:`fedglmm.likelihood.fit`.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConvergenceError, InputError
from ..likelihood.fit import Estimate, fit_glmm, fit_lmm
from ..likelihood.setup import Setup, sum_replies
from ..likelihood.starts import NB_PSI_SHIFTS, domain_start, start_values
from ..model.families import Family
from ..model.frame import na_payload
from ..model.transforms import is_stateful
from ..model.options import FitOptions
from ..model.spec import ModelSpec, Schema, theta_index
from ..protocol import request
from .schema import merge_schema
from .shared_glmm_rounds import SharedGLMMEvaluator
from .shared_rounds import SharedRoundEvaluator
from .surrogate import surrogate_model


def agree_schema(transport, formula: str, spec: ModelSpec, family: Family, na_action: str = "omit") -> Schema:
    """Round 1: each site describes its columns, levels and groups; one schema comes back."""
    desc = transport.broadcast(request("describe", formula=formula, **na_payload(na_action), **spec.columns_payload))
    return merge_schema(desc, spec, family)


def pooled_transforms(transport, formula: str, spec: ModelSpec, family: Family, na_action: str = "omit"
                      ) -> dict | None:
    """The pooled state of the formula's stateful transforms (``center(x)``, ``poly(x, 2)``, ...), from one
    ``describe`` round (the sites' sums of powers); None, and no round, for a formula without them.  The
    one-shot and hybrid methods need it before their one-shot round, whose summaries are of the
    transformed columns."""
    if not is_stateful(spec):
        return None
    return agree_schema(transport, formula, spec, family, na_action).transforms


def setup_request(formula: str, family: Family, options: FitOptions, schema: Schema, na_action: str = "omit",
                  columns: dict | None = None) -> dict:
    """Round 2 (or riding on the first evaluation): each site builds its design in the agreed coding.
    ``columns``: the weights and offset columns (:attr:`~fedglmm.model.spec.ModelSpec.columns_payload`)."""
    return request("setup", formula=formula, family=family.name, link=family.link, nagq=options.nagq,
                   reml=options.reml, curvature=options.curvature,
                   schema=schema_payload(schema), **na_payload(na_action), **(columns or {}))


def schema_payload(schema: Schema) -> dict:
    """The schema as a request carries it: kinds and levels, and the transforms' pooled state when there is one."""
    out = {"kinds": schema.kinds, "levels": schema.levels}
    if schema.transforms:
        out["transforms"] = schema.transforms
    if schema.shared:                   # which levels are shared (never by which sites, nor how many)
        out["shared"] = {f: list(levels) for f, levels in schema.shared.items()}
    return out


def check_shared_glmm(family: Family, options: FitOptions) -> None:
    """Levels shared by sites are fitted by the Laplace approximation with the observed curvature."""
    if options.nagq > 1:
        raise InputError("nagq > 1 (adaptive Gauss-Hermite quadrature) is not available when levels of a grouping "
                         "factor are shared by sites; use nagq=1 (Laplace)")
    if options.curvature == "expected" and not family.canonical:
        raise InputError(f"curvature='expected' is not available when levels are shared by sites (the {family.link} "
                         "link's fit uses the observed curvature)")


class RoundEvaluator:
    """The :class:`~fedglmm.likelihood.fit.Evaluator` of a federated fit: each call is one round.

    ``first`` (a payload such as the set-up request) rides on the first request of the fit, once;
    ``final`` rides on the finalize request (e.g. ``{"derivatives": True}``: the sites send the derivatives
    of the conditional modes too)."""

    third = True        # the sites' gaussian sums with several grouping factors bring third derivatives

    def __init__(self, transport, setup: Setup, first: dict | None = None, final: dict | None = None,
                 total=sum_replies):
        """``total(replies, keys)``: the replies' sums (default: added up as they come)."""
        self.transport, self.scale = transport, setup.scale
        self.first = dict(first or {})
        self.final = dict(final or {})
        self.total = total

    # a request may ask for the sites' third derivatives (``third``; a final one, or an evaluation round's): under
    # secure aggregation too, masked with every other sum (site.own_third.reply_third)
    third_final = True

    def _ride(self) -> dict:
        ride, self.first = self.first, {}
        return ride

    def evaluate(self, points, keys, extra=None):
        rep = self.transport.broadcast(request("evaluate", points=np.asarray(points), **self.scale, **(extra or {}),
                                               **self._ride()))
        per_point = [{sid: r["points"][i] for sid, r in rep.items()} for i in range(len(points))]
        # (a point's third derivatives where asked for and every site sent them)
        return [self.total(pp, [*keys, *(["third"] if all("third" in r for r in pp.values()) else [])])
                for pp in per_point]

    def finalize(self, point, keys, extra=None):
        rep = self.transport.broadcast(request("finalize", point=point, **self.scale, **(extra or {}),
                                               **self.final, **self._ride()))
        return self.total(rep, keys), rep


def estimate(transport, st: Setup, family: Family, options: FitOptions, start=None, first: dict | None = None,
             surrogate=None, final_first: bool = False, mode_derivatives: bool = False,
             shared_modes: tuple | None = None, variants: list | None = None) -> Estimate:
    """The Newton rounds and the final round.

    ``start`` overrides the set-up start values (internal scale: (γ, θ̃) for GLMMs, θ̃ for gaussian
    models; for GLMMs a tuple of such pairs gives candidate starts, all evaluated in the first round and
    the best kept); ``first`` rides on the first request; ``surrogate(x) -> (f, g, H)`` is a local
    stand-in for −ℓ (GLMMs; see :func:`~fedglmm.coordinator.surrogate.surrogate_model`); ``final_first``: the
    (single) GLMM start is believed to be the estimate, and the first round is final;
    ``mode_derivatives``: the conditional modes are moved from the last point to the estimate (True: and
    their SDs; ``"modes"``: the modes alone, whose derivatives cost the sites no pass over their rows);
    ``shared_modes``: with levels shared by sites, (modes, conditional SDs) by factor to start their effects
    from (:class:`~fedglmm.coordinator.shared_glmm_rounds.SharedGLMMEvaluator`); ``variants``: points tried
    beside the one start in the first round, the lowest kept (default: its covariance halved and doubled)."""
    final = {"derivatives": mode_derivatives} if mode_derivatives else None
    if st.shared and family.name != "gaussian":          # levels shared by sites: Laplace, v by the coordinator
        check_shared_glmm(family, options)
        shared = SharedGLMMEvaluator(st, modes=shared_modes)
        shared.rounds = RoundEvaluator(transport, st, first, final, total=shared.total)
        gamma0, theta0 = start_values(st, family) if start is None else start[0] if isinstance(start[0], tuple) \
            else start
        # every start is tried (their v's settle in the same rounds), and the Newton rounds go on from the lowest,
        # sound or not: one with a positive definite Hessian 1.4 higher led rare binary outcomes over 200
        # levels to a local optimum at SD 0, 5.6 below the pooled logLik (tests/test_shared_start.py)
        # (one grouping factor: with several -- cbpp_olre, verbagg_la, sim_doctors_la, sim_items_pois over 3 sites
        # -- the other starts changed no fit's rounds and cost cbpp_olre 13-21 % more time)
        more = [np.concatenate(x) for x in start[1:]] if start is not None and isinstance(start[0], tuple) \
            and len(st.factor_columns()) == 1 else None
        return _with_likelihood(fit_glmm(shared, st, gamma0, theta0, options, more))
    if st.shared:                      # levels shared by sites, gaussian: exact sums
        if start is None and "xty" not in st.sums:        # one grouping factor: no joint moment start
            start = np.eye(st.mask.shape[0])[theta_index(st.mask)] if st.mask.shape[0] else None
        shared = SharedRoundEvaluator(st, options.reml)
        shared.rounds = RoundEvaluator(transport, st, first, final, total=shared.total)
        return fit_lmm(shared, st, options, start)
    evaluator = RoundEvaluator(transport, st, first, final if family.name != "gaussian" or st.factor_groups else None)
    if family.name == "gaussian":
        return fit_lmm(evaluator, st, options, start)
    model = surrogate_model(surrogate, family.name == "negative_binomial") if surrogate is not None else None
    others = None
    if start is not None and isinstance(start[0], tuple):
        # candidate starts from different sources: go on from a sound one
        (gamma0, theta0), others = start[0], [np.concatenate(s) for s in start[1:]]
    else:
        gamma0, theta0 = start if start is not None else start_values(st, family)
    others, sound = (variants, False) if variants is not None else (others, others is not None)
    shifts = NB_PSI_SHIFTS if family.name == "negative_binomial" else ()
    try:
        est = fit_glmm(evaluator, st, gamma0, theta0, options, others, model, shifts,
                       final_first=final_first and others is None, sound_start=sound,
                       poisson_limit=family.name == "negative_binomial",
                       fallback=domain_start(st, family, gamma0, theta0), runaway_stop=True, far=start is None)
        return _with_likelihood(est)
    except ConvergenceError as exc:
        if not family.positive_eta:
            raise
        # (glmer: "PIRLS loop resulted in NaN value"; glmmTMB: "NaN at starting parameter values")
        raise ConvergenceError(f"{exc} (the {family.link} link needs a positive mean at every row, which strong "
                               "covariates or a large random-effect variance leave little room for: the log "
                               "link, --link log, has no such bound)") from None


def _with_likelihood(est: Estimate) -> Estimate:
    """The estimate, or ConvergenceError where its log-likelihood is not finite: never a fit without one (a
    Gamma inverse-link fit whose random slopes' modes started outside the domain ended "converged" with
    logLik and standard errors NaN)."""
    if not np.isfinite(est.loglik):
        raise ConvergenceError("the log-likelihood is not finite at the estimate the rounds ended at")
    return est
