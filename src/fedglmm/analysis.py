"""What an analyst asks of a fitted model after the fit, through its sites: the diagnostics round, the
posterior means of the random effects, profile-likelihood intervals and the ML refit of a REML fit.

Each is one or a few more rounds through the fit's :class:`~fedglmm.coordinator.session.Session`
(counted apart from the fit's rounds, in :attr:`FitResult.after_fit`), and each result is kept on the
:class:`~fedglmm.results.FitResult` so that asking again costs nothing.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .errors import FedGLMMError
from .model.labels import natural_order


def apply(res, analysis) -> None:
    """The post-fit choices of an :class:`~fedglmm.model.options.Analysis`: df, diagnostics, profile."""
    if analysis is None:
        return
    res.ddf = analysis.ddf
    if analysis.diagnostics:
        diagnose(res, analysis.seed)
    if analysis.ci == "profile":
        profile_intervals(res, analysis.level)


def _session(res):
    if res.session is None or not hasattr(res.session, "link"):
        raise FedGLMMError("this fit has no line to its sites (it was read back, or fitted from summary files)")
    return res.session


def diagnose(res, seed: int = 0):
    """The diagnostics round (:mod:`fedglmm.coordinator.diagnostics`); kept as ``res.diagnostics``."""
    from .coordinator.diagnostics import run_diagnostics

    if res.diagnostics is None or res.diagnostics.seed != seed:
        res.diagnostics = run_diagnostics(_session(res), seed)
    return res.diagnostics


def posterior_means(res, nodes: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Posterior means and SDs of the random effects, one row per group level (NaN where withheld)."""
    from .coordinator.diagnostics import posterior_means as rounds

    if res.modes is None:
        raise ValueError("this model has no random effects")
    if res.posterior is None:
        session = _session(res)
        levels, mean, sd, withheld = rounds(session, nodes)
        zs = session.setup.zs
        cols = list(res.modes.columns)
        gap = np.full((len(withheld), len(cols)), np.nan)
        index = levels + withheld
        order = natural_order(np.asarray(index, dtype=str))
        m = pd.DataFrame(np.vstack([mean / zs, gap]), index=index, columns=cols).iloc[order]
        s = pd.DataFrame(np.vstack([sd / zs, gap]), index=index, columns=cols).iloc[order]
        res.posterior = (m.reindex(res.modes.index), s.reindex(res.modes.index))
    return res.posterior


def refit_ml(res):
    """A REML fit refitted by maximum likelihood at the same sites, from the REML estimate (a few Newton
    rounds); the refit's rounds are its own, and also counted under ``"refit"`` for ``res``."""
    from dataclasses import replace

    from .coordinator.assemble import assemble
    from .coordinator.rounds import estimate
    from .run_stats import RunStats

    if not res.reml:
        return res
    if res.refit is None:
        session = _session(res)
        link, t0 = session.link, time.perf_counter()
        before = dict(link.usage.rounds), dict(link.usage.bytes_to_sites), dict(link.usage.bytes_from_sites)
        options = replace(session.options, reml=False)
        est = estimate(link.as_transport("refit"), session.setup, session.family, options,
                       start=np.asarray(session.estimate.theta, float))
        parts = assemble(session.formula, session.family, options, session.spec, session.schema, session.setup,
                         est)
        used = [link.usage.rounds.get("refit", 0) - before[0].get("refit", 0),
                link.usage.bytes_to_sites.get("refit", 0) - before[1].get("refit", 0),
                link.usage.bytes_from_sites.get("refit", 0) - before[2].get("refit", 0)]
        run = RunStats(used[0], used[1], used[2], time.perf_counter() - t0, tuple(res.site_ids))
        out = type(res).build(parts, run)
        out.ddf, out.session = res.ddf, session.with_estimate(est, options)
        res.refit = out
    return res.refit


def profile_intervals(res, level: float = 0.95) -> pd.DataFrame:
    """Profile-likelihood intervals of the random-effect SDs and correlations, σ and the fixed effects
    (:mod:`fedglmm.coordinator.profile`), a DataFrame like ``conf_int()``; ``attrs["rounds"]`` holds the
    rounds all of them took.  As lme4, a REML fit is profiled on the ML deviance."""
    from .coordinator.profile import profile

    if not 0.0 < level < 1.0:
        raise ValueError("level must be between 0 and 1")
    key = round(float(level), 12)
    if key not in res.profiles:
        session, t0 = _session(res), time.perf_counter()
        ends, info = profile(session, level)
        pct = f"{100 * (1 - level) / 2:g} %", f"{100 * (1 + level) / 2:g} %"
        tab = pd.DataFrame([ends[k] for k in ends], index=list(ends), columns=list(pct))
        tab.attrs.update(rounds=info["rounds"], not_found=info["not_found"], level=level,
                         deviance=info["deviance"], seconds=time.perf_counter() - t0)
        if info["not_found"]:
            res.messages.append(f"profile: {len(info['not_found'])} interval end(s) not found within "
                                f"{info['rounds']} rounds (NaN): {', '.join(info['not_found'])}")
        res.profiles[key] = tab
    return res.profiles[key]
