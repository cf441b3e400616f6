"""The Python entry point: ``fedglmm.fit(formula, data, family=..., ...)``."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np
import pandas as pd

from .errors import InputError
from .families import get_family
from .methods.iterative import FitOptions, fit_iterative
from .optimize import NewtonConfig
from .results import FitResult
from .site import Site
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
        return {str(k): g.reset_index(drop=True) for k, g in data.groupby(site, sort=True)}
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


def make_sites(data, site: str | None = None) -> dict[str, Site]:
    return {sid: Site(sid, frame) for sid, frame in split_sites(data, site).items()}


def fit(formula: str, data, family: str = "gaussian", link: str | None = None, nagq: int = 1,
        reml: bool = True, site: str | None = None, method: str = "iterative", curvature: str = "observed",
        on_round: Callable[[int, str], None] | None = None, newton: NewtonConfig | None = None) -> FitResult:
    """Fit a (generalised) linear mixed model federated over sites.

    Parameters
    ----------
    formula : lme4-style formula, e.g. ``"use ~ urban + age + (1 + urban | district)"``.
    data : a DataFrame (with ``site=`` naming its site column, or one site), a list or a dict of DataFrames.
    family, link : ``gaussian`` (identity), ``binomial`` (logit, probit, cloglog), ``poisson`` (log).
    nagq : 1 for the Laplace approximation, K > 1 for adaptive Gauss–Hermite with K nodes per dimension.
    reml : REML (default, as lme4) or ML for gaussian models; ignored otherwise.
    method : ``iterative`` (exact Newton rounds).
    curvature : the curvature in the Laplace / AGHQ determinant and node scaling for non-canonical links
        (probit, cloglog): ``observed`` (default, the exact Laplace approximation, as glmmTMB) or
        ``expected`` (Fisher weights, lme4's glmer).  Canonical links give the same either way.
    on_round : called as ``on_round(round_number, request_kind)`` after each round.
    """
    fam = get_family(family, link)
    if isinstance(nagq, bool) or not isinstance(nagq, (int, np.integer)) or nagq < 1:
        raise InputError(f"nagq must be a whole number ≥ 1, not {nagq!r}")
    nagq = int(nagq)
    if curvature not in ("observed", "expected"):
        raise InputError(f"curvature must be 'observed' or 'expected', not {curvature!r}")
    if method != "iterative":
        raise InputError(f"unknown method '{method}': use 'iterative'")
    transport = InProcessTransport(make_sites(data, site), on_round=on_round)
    options = FitOptions(nagq=nagq, reml=bool(reml), curvature=curvature, newton=newton or NewtonConfig())
    return fit_iterative(transport, formula, fam, options)
