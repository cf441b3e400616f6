"""The Python entry point: ``fedglmm.fit(formula, data, family=..., ...)``."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable

import pandas as pd

from .errors import InputError
from .likelihood.blas import single_blas
from .model.labels import number_rows
from .model.options import MIN_GROUP, Analysis, FitRequest, NewtonConfig, OptionError, analysis_request, \
    expand_request, fit_request
from .results import FitResult
from .site import Site, SiteConfig
from .transport import InProcessTransport


def split_sites(data, site: str | None = None) -> dict[str, pd.DataFrame]:
    """Turn the accepted forms of ``data`` into ``{site_id: frame}``.

    ``data`` is a DataFrame (one site, or several when ``site`` names a column), a list of DataFrames
    (sites ``site1``, ``site2``, …) or a dict ``{site_id: DataFrame}``.
    """
    if isinstance(data, pd.DataFrame):
        if site is None:
            return {"site1": data}
        if site not in data.columns:
            raise InputError(f"site column '{site}' not found (columns: {', '.join(map(str, data.columns))})")
        if data[site].isna().any():
            raise InputError(f"site column '{site}' has missing values")
        # rows keep their numbers in ``data`` (or their lines in its file), so messages name them as the user sees them
        return {str(k): g for k, g in number_rows(data).groupby(site, sort=True)}
    if site is not None:
        raise InputError("site= names a column of a single DataFrame; with several frames each is a site")
    if isinstance(data, Mapping):
        frames = {str(k): v for k, v in data.items()}
    elif isinstance(data, Sequence) and not isinstance(data, str):
        frames = {f"site{i + 1}": v for i, v in enumerate(data)}
    else:
        raise InputError("data must be a DataFrame, a list of DataFrames or a dict of DataFrames")
    if not frames:
        raise InputError("no sites given")
    for k, v in frames.items():
        if not isinstance(v, pd.DataFrame):
            raise InputError(f"site '{k}': data must be a DataFrame, not {type(v).__name__}")
    return frames


def make_sites(data, site: str | None = None, min_group: int = MIN_GROUP,
               config: SiteConfig | None = None) -> dict[str, Site]:
    """One :class:`Site` per frame; ``config`` (the same rules for every site) replaces the permissive
    in-process default, and its ``min_group`` then replaces ``min_group``."""
    return {sid: Site(sid, frame, min_group=min_group, config=config) for sid, frame in split_sites(data, site).items()}


def as_site_config(site_config) -> SiteConfig | None:
    """None, a :class:`SiteConfig`, or the path of a ``site.toml``."""
    if site_config is None or isinstance(site_config, SiteConfig):
        return site_config
    if isinstance(site_config, (str, Path)):
        return SiteConfig.load(site_config)
    raise InputError(f"site_config must be a SiteConfig or the path of a site.toml, not {type(site_config).__name__}")


def fit(formula: str, data, family: str = "gaussian", link: str | None = None, nagq: int = 1,
        reml: bool = True, site: str | None = None, method: str = "hybrid", curvature: str = "observed",
        moments: int | None = None, min_group: int = MIN_GROUP, penalty: float = 0.0,
        on_round: Callable[[int, str], None] | None = None, newton: NewtonConfig | None = None,
        site_config: SiteConfig | str | Path | None = None, na_action: str = "omit", ddf: str = "satterthwaite",
        ci: str = "wald", diagnostics: bool = False, seed: int = 0, secure_aggregation: bool = False,
        weights: str | None = None, offset: str | None = None) -> FitResult:
    """Fit a (generalised) linear mixed model federated over sites.

    Parameters
    ----------
    formula : lme4-style formula, e.g. ``"use ~ urban + age + (1 + urban | district)"``.
    data : a DataFrame (with ``site=`` naming its site column, or one site), a list or a dict of DataFrames.
    family, link : ``gaussian`` (identity), ``binomial`` (logit, probit, cloglog), ``poisson`` (log),
        ``negative_binomial`` (alias ``nbinom2``; log; variance μ + μ²/ϑ) or ``gamma`` (alias ``Gamma``;
        inverse, log, identity).  The last two estimate their dispersion by maximum likelihood, as glmmTMB
        (``res.dispersion``: ``{"theta": ϑ, "se": …}`` or ``{"sigma": CV, "se": …}``).
    weights : a column of prior weights (finite, ≥ 0): gaussian, precision weights (row variance σ²/w, as
        lmer); binomial, the trials of a proportion outcome (``incidence / size ~ …, weights="size"``: the
        ``cbind`` fit); poisson, negative binomial, Gamma, the weight of each row's log-likelihood (glmmTMB).
    offset : a column added to the linear predictor, as ``offset(column)`` in the formula.
    nagq : 1 for the Laplace approximation, K > 1 for adaptive Gauss–Hermite with K nodes per dimension.
    reml : REML (default, as lme4) or ML for gaussian models; ignored otherwise.
    method : ``hybrid`` (the default: one round of one-shot summaries -- order-2 moments per group and
        each site's own fit of its rows -- then exact Newton rounds from their combination, with steps
        from the pseudo-data corrected by the sites' exact derivatives: the pooled fit in 2 rounds with
        one site, 3-4 split over sites on the reference cases), ``iterative`` (exact Newton rounds from
        starting values built from site totals: 5-9 rounds, less work at the sites and the coordinator)
        or ``oneshot`` (one round only: exact for gaussian models, pseudo-data matched to the shared
        moments otherwise).
    moments : the order K (2, 3 or 4) of the moments shared per group for binomial/poisson one-shot fits
        (default 4; the hybrid asks for 2: it needs only a start).
    min_group : a site's smallest group whose own summaries it sends (one-shot and hybrid).
    penalty : λ ≥ 0 of an L2 penalty λ‖β‖² on the fixed effects but the intercept (binomial, poisson),
        applied by the coordinator; the sites' sums are the same.
    curvature : the curvature in the Laplace / AGHQ determinant and node scaling for non-canonical links
        (probit, cloglog): ``observed`` (default, the exact Laplace approximation, as glmmTMB) or
        ``expected`` (Fisher weights, lme4's glmer).  Canonical links give the same either way.
    site_config : disclosure rules applied by every site (a :class:`~fedglmm.site.SiteConfig` or
        the path of a ``site.toml``); a site that refuses stops the fit with its one-line reason
        (:class:`~fedglmm.errors.SiteRefusal`), and conditional modes of groups below its ``min_group``
        come back as NaN.  Its ``min_group`` replaces ``min_group``.  Default: no rules but ``min_group``
        for one-shot summaries.
    ddf : gaussian models: ``"satterthwaite"`` (the default) for t-tests with Satterthwaite degrees of
        freedom, as lmerTest, or ``"none"`` for z-tests.
    ci : ``"profile"`` also computes the profile-likelihood intervals (``res.conf_int(method="profile")``;
        a few more rounds), ``"wald"`` (the default) leaves them for later.
    diagnostics : run the diagnostics round (one more round: binned residual aggregates from every
        site, see ``res.diagnose()``); ``seed`` seeds its randomised residuals.
    on_round : called as ``on_round(round_number, request_kind)`` after each round.
    na_action : ``omit`` (the default, as lme4's ``na.omit``): each site drops its rows with a missing value in
        a column the model uses, and the result counts them per site (:attr:`FitResult.omitted`); ``fail``:
        a missing value stops the fit, naming the site, column and row.
    secure_aggregation : mask every site's sums so the coordinator receives each round's sums only as the
        total over sites (:mod:`fedglmm.coordinator.secagg`; the results are the same to 1e-10).  Off by
        default here: in-process sites share the coordinator's process, so masking protects nothing; it
        is on by default over a federation of three or more sites (:func:`fit_on`).
    """
    req = fit_request(formula, family, link, nagq, reml, method, curvature, moments, penalty, newton, na_action,
                      weights, offset)
    analysis = analysis_request(ddf, ci, 0.95, diagnostics, seed)
    return fit_request_on_data(req, data, site=site, min_group=min_group, site_config=site_config,
                               on_round=on_round, analysis=analysis, secure_aggregation=secure_aggregation)


def fit_request_on_data(req: FitRequest, data, site: str | None = None, min_group: int = MIN_GROUP,
                        site_config=None, on_round=None, analysis: Analysis | None = None,
                        secure_aggregation: bool = False) -> FitResult:
    """A validated fit (:func:`fedglmm.model.options.fit_request`) on in-process sites built from ``data``."""
    config = as_site_config(site_config)
    sites = make_sites(data, site, min_group, config)
    # y ~ . : the columns are those of the frames in hand (every site must have the same ones)
    req = expand_request(req, next(iter(sites.values())).frame.columns, site)
    return run(InProcessTransport(sites, on_round=on_round), req, analysis, secure_aggregation)


def fit_on(transport, formula: str, family: str = "gaussian", link: str | None = None, nagq: int = 1,
           reml: bool = True, method: str = "hybrid", curvature: str = "observed", moments: int | None = None,
           penalty: float = 0.0, newton: NewtonConfig | None = None, na_action: str = "omit",
           ddf: str = "satterthwaite", ci: str = "wald", diagnostics: bool = False, seed: int = 0,
           secure_aggregation: bool | None = None, weights: str | None = None,
           offset: str | None = None) -> FitResult:
    """Fit over any :class:`~fedglmm.transport.Transport` (e.g. a Flower federation); options as :func:`fit`.

    The sites' own settings (``min_group``, disclosure rules) live with the sites, not here.
    ``secure_aggregation=None``: on for a federation (a transport marked ``federated``, as Flower's) of
    three or more sites and a method with rounds of sums (not ``oneshot``), off otherwise.
    """
    req = fit_request(formula, family, link, nagq, reml, method, curvature, moments, penalty, newton, na_action,
                      weights, offset)
    if secure_aggregation is None:
        secure_aggregation = bool(getattr(transport, "federated", False)) and req.method != "oneshot" \
            and len(transport.site_ids) >= 3
    return run(transport, req, analysis_request(ddf, ci, 0.95, diagnostics, seed), secure_aggregation)


def run(transport, req: FitRequest, analysis: Analysis | None = None, secure_aggregation: bool = False
        ) -> FitResult:
    """Run the request's method over ``transport`` (with its sums masked if ``secure_aggregation``), then
    the post-fit rounds ``analysis`` asks for.  A formula with ``.`` (every other column) first asks the
    sites for their columns: one ``describe`` round, only for such formulas."""
    from .analysis import apply

    if req.dot:
        from .model.frame import na_payload
        from .model.rsyntax import without_dot
        from .protocol import request

        desc = transport.broadcast(request("describe", formula=without_dot(req.formula), **na_payload(req.na_action),
                                           **req.spec.columns_payload))
        req = expand_request(req, list(next(iter(desc.values()))["columns"]))
    if secure_aggregation:
        from .coordinator.secagg import SecureTransport

        if req.method == "oneshot":
            raise OptionError("secure aggregation applies to rounds of sums; the one-shot method sends per-group "
                              "summaries, which cannot be masked (use --method iterative or hybrid)")
        if len(transport.site_ids) < 2:
            raise InputError("secure aggregation needs at least 2 sites (with one, the total is that site's sums)")
        transport = SecureTransport(transport)
    if req.method == "iterative":
        from .methods.iterative import fit_iterative as method
    elif req.method == "hybrid":
        from .methods.hybrid import fit_hybrid as method
    else:
        from .methods.oneshot import fit_oneshot as method
    with single_blas():                  # the fit's parallelism is its own threads (likelihood/blas.py)
        res = method(transport, req)
        apply(res, analysis)
    return res


def fit_summaries(summaries, formula: str, family: str = "gaussian", link: str | None = None, nagq: int = 1,
                  reml: bool = True, curvature: str = "observed", weights: str | None = None,
                  offset: str | None = None) -> FitResult:
    """The one-shot fit from the sites' summary files (written by ``fedglmm summarize``) or messages."""
    import json

    from .coordinator.messages import from_jsonable
    from .methods.oneshot import fit_from_messages

    req = fit_request(formula, family, link, nagq, reml, "oneshot", curvature, weights=weights, offset=offset)
    messages, size = {}, 0
    for item in summaries:
        if isinstance(item, dict):
            msg = item
        else:
            path = Path(item)
            try:
                text = path.read_text()
                msg = json.loads(text)
            except OSError as e:
                raise InputError(f"cannot read summaries '{path}': {e.strerror or e}") from None
            except json.JSONDecodeError as e:
                raise InputError(f"summaries '{path}' are not valid JSON: {e.msg} (line {e.lineno})") from None
            size += len(text.encode())
        if not isinstance(msg, dict) or msg.get("kind") != "oneshot" or "site" not in msg:
            raise InputError(f"summaries '{item}' are not a fedglmm one-shot summary")
        if msg["site"] in messages:
            raise InputError(f"two summaries come from site '{msg['site']}'")
        messages[msg["site"]] = from_jsonable(msg)
    if not messages:
        raise InputError("no summaries given")
    req = expand_request(req, list(next(iter(messages.values()))["description"]["columns"]))      # y ~ .
    return fit_from_messages(messages, req, rounds=1, bytes_from=size)
