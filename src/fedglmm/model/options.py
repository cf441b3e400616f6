"""The user's fit options, validated once, and the defaults every part of the package shares."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Integral
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:          # imported where used: the command line reads the defaults without loading them
    from .families import Family
    from .spec import ModelSpec

NA_ACTIONS = ("omit", "fail")   # rows with a missing value in a used column: dropped (as lme4) or refused
MIN_GROUP = 10          # default smallest group (observations) whose own summaries or modes a site sends
MIN_POOLED = 5          # default fewest small groups pooled in one bin of the hybrid's block (site/pooled.py)
POOLED_MAX_GROUPS = 5000   # binned small groups beyond which their pseudo-groups cost the coordinator more
                           # than the round they may save (a site with more sends no bins)
# a site with this many groups has a log-likelihood close to quadratic around its own fit (third derivatives
# shrink like one over the square root of the groups): the hybrid combines such fits without pseudo-data
OWN_FIT_GROUPS = 500
# a site with fewer groups fits a random-effect covariance too poorly for its own fit to start the hybrid
# well; of a negative binomial or a Gamma model it then also sends per-group moments, as of a poisson
# (site/summaries.py)
FEW_GROUPS = 15
# a site with this many groups cuts its own fit short (site.own_fit.MANY_TOL), without third derivatives: its
# fit is a start, and the Newton rounds correct what the shortcut leaves (1e6 rows over 100 sites, 100 groups
# each: the one-shot round's site CPU 4.9 -> 3.3 s, rounds the same)
CUT_SHORT_GROUPS = 100
# beyond this many sites, a site whose groups (fewer than SKIP_OWN_GROUPS) all go as summaries does not fit
# its own rows for the hybrid's start: its fit adds little to the pseudo-data and costs most of the round
# (1e5 rows over 100 sites, 10 groups each: the one-shot round's site CPU 5.6 s -> 0.9 s, rounds the same)
MANY_SITES = 20
SKIP_OWN_GROUPS = 50
METHODS = ("hybrid", "iterative", "oneshot")
CURVATURES = ("observed", "expected")
DDF = ("satterthwaite", "none")
MOMENT_ORDERS = (2, 3, 4)


class OptionError(InputError):
    """An option (family, link, formula, method, ...) that is wrong whatever the data: a usage error."""


@dataclass(frozen=True)
class NewtonConfig:
    """Immutable settings of the trust-region Newton method (:mod:`fedglmm.likelihood.newton`)."""

    tol: float = 1e-7           # Newton decrement gᵀH⁻¹g at which the final candidate is accepted
    near: float = 1e-3          # decrement below which the next (Newton) point is the final candidate
    max_evals: int = 60         # rounds at most
    radius0: float = 3.0        # initial trust radius (scaled units) when the Hessian is indefinite
    accept: float = 1e-4        # least ratio of actual to predicted decrease for accepting a step
    spread: float = 4.0         # candidate radii Δ/spread, Δ, spread·Δ while the model is not trusted
    near_model: float = 0.05    # with a caller's model (see ``model``): decrement below which its step is
                                # proposed as the final candidate
    single: bool = False        # one trust-region point per round (a local fit, where rounds are cheap)
    hedge: bool = True          # a round of long steps only also tries shorter ones (likelihood.candidates.hedges)
    extrapolate: float = 1.1    # a full Newton step that gained this many times its predicted decrease (it
                                # fell short: F flattens ahead) has the next round try it doubled and
                                # quadrupled too; 0: never
    log_steps: bool = True      # where a Newton step grows a standard deviation, also try it in log scale
    final_third: bool = True    # the sites' third derivatives are asked for (a final round predicted to land just
                                # above tol, a round's point near the optimum: likelihood.newton_end)
    third_at_final: bool = True  # ... at a final point after any step to third order (not by quadrature nor
                                 # with more than 8 parameters: likelihood.fit._newton_config)
    third_points: int = 2       # ... at this many of a round's points
    third_max: int = 8          # ... in a fit of at most this many parameters (the sites' work: P Hessians each)
    third_final: float = 1e-15  # ... at a final point whose decrement is predicted above this (one grouping factor)
    third_start: bool = False   # ... at every start of the first round (the hybrid's start from site totals:
                                # methods.hybrid)
    third_start_cov: bool = False  # ... or there along the covariance parameters alone (len(θ, ψ) Hessians a point,
                                   # not P: the hybrid's start from its sites' fits of few groups)
    third_steps: bool = False   # ... at the steps to third order beside Newton's and the model's (the hybrid)
    bare_settle: float = float("inf")   # a last step longer than this in H's norm from a final point without
                                        # third derivatives is settled by one more final round (levels shared
                                        # by sites: likelihood.newton_end.Ending._stop_or_settle)

    @property
    def local(self) -> "NewtonConfig":
        """These settings for a GLMM fit evaluated in place (a site's own fit, the coordinator's pseudo-data
        fit), where a point costs what a round does: no extra points beside the Newton step's (with them the
        one-site fits of the reference cases took up to 1.5 times as long, in as many rounds)."""
        return replace(self, extrapolate=0.0, log_steps=False, final_third=False, hedge=False)


@dataclass(frozen=True)
class FitOptions:
    """How to fit (not what): approximation, criterion, curvature, penalty and the optimiser's settings."""

    nagq: int = 1
    reml: bool = True
    curvature: str = "observed"
    penalty: float = 0.0        # λ of an L2 penalty λ‖β‖² on the fixed effects but the intercept
    newton: NewtonConfig = field(default_factory=NewtonConfig)


@dataclass(frozen=True)
class FitRequest:
    """A validated fit: the formula and its parse, the family, the options, the method and moment order."""

    formula: str
    spec: ModelSpec
    family: Family
    options: FitOptions
    method: str = "hybrid"
    moments: int | None = None
    na_action: str = "omit"     # rows with a missing value in a used column: "omit" (as lme4) or "fail"
    dot: bool = False           # the formula uses '.' (every other column): see expand_request


def fit_request(formula: str, family="gaussian", link: str | None = None, nagq=1, reml=True,
                method: str = "hybrid", curvature: str = "observed", moments=None, penalty=0.0,
                newton: NewtonConfig | None = None, na_action: str = "omit", weights: str | None = None,
                offset: str | None = None) -> FitRequest:
    """Validate everything the user chose, once.  A choice that is wrong whatever the data raises
    :class:`OptionError`; one that does not fit this model (nagq for a gaussian model, ...) raises
    :class:`~fedglmm.errors.InputError`.  ``weights`` and ``offset`` name columns (prior weights; an
    offset beside any ``offset()`` of the formula)."""
    from .families import get_family
    from .formula import parse_formula
    from .rsyntax import has_dot, without_dot

    dot = isinstance(formula, str) and has_dot(formula)
    try:
        fam = get_family(family, link)
        spec = parse_formula(without_dot(formula) if dot else formula)
        spec = spec.with_columns(_column_name(weights, "weights"), _column_name(offset, "offset"))
    except InputError as exc:
        raise OptionError(str(exc)) from None
    options, method, moments = _check_values(nagq, reml, method, curvature, moments, penalty, newton)
    if len(spec.groups) > 1 and method == "oneshot" and fam.name != "gaussian":
        raise OptionError("the one-shot method fits binomial and poisson models with one grouping factor; this "
                          f"formula has {len(spec.groups)} ({', '.join(spec.groups)}): use --method hybrid or "
                          "iterative")
    if na_action not in NA_ACTIONS:
        raise OptionError(f"na_action must be 'omit' (drop rows with a missing value, as lme4) or 'fail', "
                          f"not {na_action!r}")
    check_model(spec, fam, options)
    return FitRequest(formula, spec, fam, options, method, moments, na_action, dot)


def expand_request(req: FitRequest, columns, site_column: str | None = None) -> FitRequest:
    """``req`` with the ``.`` of its formula expanded to ``columns`` (in their order) less the response's
    columns, the grouping columns and ``site_column``, as R's ``y ~ .`` (:func:`~fedglmm.model.rsyntax.expand_dot`);
    ``req`` itself when its formula has no ``.``."""
    if not req.dot:
        return req

    from .formula import expression_columns, parse_formula
    from .rsyntax import expand_dot

    spec = req.spec
    exclude = expression_columns(spec.response) + (expression_columns(spec.failures) if spec.failures else [])
    exclude += list(spec.grouping_columns) + ([site_column] if site_column else [])
    exclude += [c for c in (spec.weights, spec.offset_column) if c is not None]
    formula = expand_dot(req.formula, columns, exclude)
    spec = parse_formula(formula).with_columns(spec.weights, spec.offset_column)
    check_model(spec, req.family, req.options)
    return replace(req, formula=formula, spec=spec, dot=False)


def _column_name(value, what: str) -> str | None:
    """A column named by ``weights=`` or ``offset=``: None or a non-empty text."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} must name a column of the data, not {value!r}")
    return value.strip()


def _check_values(nagq, reml, method, curvature, moments, penalty, newton):
    if isinstance(nagq, bool) or not isinstance(nagq, Integral) or nagq < 1:
        raise OptionError(f"nagq must be a whole number ≥ 1, not {nagq!r}")
    if curvature not in CURVATURES:
        raise OptionError(f"curvature must be 'observed' or 'expected', not {curvature!r}")
    if method not in METHODS:
        raise OptionError(f"unknown method '{method}': use 'hybrid', 'iterative' or 'oneshot'")
    if moments is not None and (isinstance(moments, bool) or not isinstance(moments, Integral)
                                or moments not in MOMENT_ORDERS):
        raise OptionError(f"moments must be 2, 3 or 4, not {moments!r}")
    try:
        penalty = float(penalty)
    except (TypeError, ValueError):
        raise OptionError(f"the penalty must be a number, not {penalty!r}") from None
    options = FitOptions(nagq=int(nagq), reml=bool(reml), curvature=curvature, penalty=penalty,
                         newton=newton or NewtonConfig())
    return options, method, None if moments is None else int(moments)


CI_METHODS = ("wald", "profile")


@dataclass(frozen=True)
class Analysis:
    """What to do after the fit, through the sites: t-test df, profile intervals, the diagnostics round."""

    ddf: str = "satterthwaite"
    ci: str = "wald"
    level: float = 0.95
    diagnostics: bool = False
    seed: int = 0


def analysis_request(ddf="satterthwaite", ci="wald", level=0.95, diagnostics=False, seed=0) -> Analysis:
    """Validated post-fit choices (a wrong value raises :class:`OptionError`)."""
    ddf = check_ddf(ddf)
    if not isinstance(ci, str) or ci.lower() not in CI_METHODS:
        raise OptionError(f"ci must be 'wald' or 'profile', not {ci!r}")
    try:
        level = float(level)
    except (TypeError, ValueError):
        raise OptionError(f"the confidence level must be a number, not {level!r}") from None
    if not 0.0 < level < 1.0:
        raise OptionError(f"the confidence level must be between 0 and 1, not {level}")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise OptionError(f"the seed must be a whole number, not {seed!r}")
    return Analysis(ddf, ci.lower(), level, bool(diagnostics), int(seed))


def check_ddf(ddf: str) -> str:
    """The t-tests' degrees of freedom for gaussian models: ``satterthwaite`` or ``none`` (z-tests)."""
    if not isinstance(ddf, str) or ddf.lower() not in DDF:
        raise OptionError(f"ddf must be 'satterthwaite' or 'none', not {ddf!r}")
    return ddf.lower()


def check_model(spec: ModelSpec, family: Family, options: FitOptions) -> None:
    """The options against the model: what this family and formula allow."""
    if options.penalty < 0 or not math.isfinite(options.penalty):
        raise InputError(f"the penalty must be a non-negative number, not {options.penalty}")
    if options.penalty and family.name == "gaussian":
        raise InputError("the L2 penalty is available for binomial and poisson models")
    if family.ndisp and options.curvature == "expected":
        raise InputError(f"curvature='expected' applies to binomial models; {family.name} models use the observed "
                         "curvature (the exact Laplace approximation, as glmmTMB)")
    if family.name == "gaussian" and options.nagq > 1:
        raise InputError("nagq applies to binomial and poisson models; gaussian likelihoods are exact")
    if spec.random == () and options.nagq > 1:
        raise InputError("nagq needs a random-effects term in the formula")
    if len(spec.groups) > 1 and options.nagq > 1:
        raise InputError(f"nagq > 1 (adaptive Gauss-Hermite quadrature) needs a single grouping factor; this "
                         f"formula has {len(spec.groups)} ({', '.join(spec.groups)}): use nagq = 1 (Laplace)")
