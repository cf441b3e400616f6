"""The fitted model: coefficient table, variance components, fit criteria, conditional modes, predictions.

A :class:`FitResult` is what the coordinator ends with; it holds no row of any site.  Tests of the fixed
effects: for gaussian models t-tests with Satterthwaite degrees of freedom (as lmerTest's summary; see
:mod:`fedglmm.coordinator.satterthwaite`), unless ``ddf="none"``; otherwise Wald z-tests (z and
Pr(>|z|), as lme4 reports for GLMMs).  ``conf_int()`` gives Wald intervals β̂ ± z_{1−α/2}·SE.  AIC = −2ℓ + 2k and BIC = −2ℓ + k log n with k counting the fixed effects, the
random-effect covariance parameters and, for gaussian models, the residual variance (lme4's ``df``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from .model.families import Family
from .model.spec import ModelSpec, Schema
from .run_stats import RunStats


@dataclass
class FitResult:
    formula: str
    family: Family
    method: str
    nagq: int
    reml: bool
    fixef: pd.Series
    vcov: pd.DataFrame
    cov_re: pd.DataFrame | dict | None   # covariance of the random effects (data scale); by factor if several
    residual_sd: float | None
    loglik: float
    n_params: int
    nobs: int
    ngroups: dict
    nsites: int
    rounds: int
    bytes_to_sites: int
    bytes_from_sites: int
    converged: bool
    seconds: float
    group_name: str | None = None
    modes: pd.DataFrame | dict | None = None    # conditional modes, one row per group level (by factor)
    condsd: pd.DataFrame | dict | None = None   # their conditional standard deviations
    theta: np.ndarray | None = None
    spec: ModelSpec | None = None
    schema: Schema | None = None
    messages: list = field(default_factory=list)
    df_satterthwaite: pd.Series | None = None   # gaussian: Satterthwaite df of each fixed effect
    level_sites: pd.Series | None = None        # the site of each group level
    design_moments: dict | None = None          # pooled n, column sums, XᵀX and ZᵀZ (user scale)
    trace: list = field(default_factory=list)   # per Newton round: round, objective, Newton decrement
    dispersion: dict | None = None              # negative binomial {"theta", "se"}, Gamma {"sigma", "se"}
    site_ids: list = field(default_factory=list)
    ddf: str = "satterthwaite"                  # gaussian t-tests: "satterthwaite", or "none" for z-tests
    # the line back to the sites, for the rounds after the fit (profiles, diagnostics, an ML refit), and
    # what those rounds gave (see fedglmm.analysis)
    session: Any = field(default=None, repr=False, compare=False)
    diagnostics: Any = field(default=None, repr=False, compare=False)
    posterior: Any = field(default=None, repr=False, compare=False)
    refit: Any = field(default=None, repr=False, compare=False)
    profiles: dict = field(default_factory=dict, repr=False, compare=False)
    secure_aggregation: bool = False     # the sums reached the coordinator only as totals over sites

    @classmethod
    def build(cls, parts, run: RunStats) -> "FitResult":
        """The result, built once from the assembled fit (:class:`fedglmm.coordinator.assemble.Assembled`)
        and how it ran."""
        fields_ = {f: getattr(parts, f) for f in parts.__dataclass_fields__}
        return cls(**fields_, nsites=len(run.site_ids), rounds=run.rounds, bytes_to_sites=run.bytes_to_sites,
                   bytes_from_sites=run.bytes_from_sites, seconds=run.seconds, site_ids=list(run.site_ids),
                   secure_aggregation=bool(run.secure))

    # --- coefficients -----------------------------------------------------------------------------
    @property
    def se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=self.fixef.index)

    @property
    def df(self) -> pd.Series | None:
        """The denominator degrees of freedom of the t-tests (Satterthwaite), or None for z-tests."""
        if self.ddf == "none" or self.df_satterthwaite is None:
            return None
        return self.df_satterthwaite

    @property
    def zvalues(self) -> pd.Series:
        """Estimate / SE: a t value when :attr:`df` is set, else a z value."""
        return self.fixef / self.se

    tvalues = zvalues

    @property
    def pvalues(self) -> pd.Series:
        """Two-sided p-values: t with :attr:`df` degrees of freedom, or normal (2 Φ(−|z|) = erfc(|z| / √2))."""
        stat = np.abs(self.zvalues.to_numpy())
        df = self.df
        if df is None:
            return pd.Series([math.erfc(z / math.sqrt(2.0)) for z in stat], index=self.fixef.index)
        from scipy import stats

        return pd.Series(2.0 * stats.t.sf(stat, df.to_numpy()), index=self.fixef.index)

    def conf_int(self, level: float = 0.95, method: str = "wald") -> pd.DataFrame:
        """Wald confidence intervals for the fixed effects, or with ``method="profile"`` profile-likelihood
        intervals for the random-effect SDs and correlations, σ and the fixed effects (a few rounds at the
        sites, all intervals at once; ``.attrs["rounds"]`` says how many), as lme4's
        ``confint(method = "profile")``."""
        if method == "profile":
            from .analysis import profile_intervals

            return profile_intervals(self, level)
        if method != "wald":
            raise ValueError("method must be 'wald' or 'profile'")
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        lo, hi = self.fixef - z * self.se, self.fixef + z * self.se
        pct = f"{100 * (1 - level) / 2:g} %", f"{100 * (1 + level) / 2:g} %"
        return pd.DataFrame({pct[0]: lo, pct[1]: hi})

    def coef_table(self, level: float = 0.95) -> pd.DataFrame:
        """Estimate, Std. Error, (df,) t or z value, p-value -- lmerTest's or lme4's columns -- and the Wald
        interval."""
        ci = self.conf_int(level)
        return pd.concat([self.tests(), ci], axis=1)

    def tests(self) -> pd.DataFrame:
        """The coefficient table as lmerTest (gaussian, Satterthwaite) or lme4 (z-tests) prints it."""
        if self.df is None:
            return pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.se, "z value": self.zvalues,
                                 "Pr(>|z|)": self.pvalues})
        return pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.se, "df": self.df,
                             "t value": self.tvalues, "Pr(>|t|)": self.pvalues})

    # --- variance components ---------------------------------------------------------------------
    def covariances(self) -> dict:
        """{grouping factor: covariance of its random effects (DataFrame, data scale)}, every factor."""
        if self.cov_re is None:
            return {}
        return dict(self.cov_re) if isinstance(self.cov_re, dict) else {self.group_name: self.cov_re}

    @property
    def random(self) -> list[dict]:
        """lme4's ``VarCorr``: for each grouping factor ``{group, term, sd}`` rows, then
        ``{group, term1, term2, corr}`` rows."""
        out = []
        for group, frame in self.covariances().items():
            cov = frame.to_numpy()
            names = list(frame.index)
            sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
            out += [{"group": group, "term": n, "sd": float(s)} for n, s in zip(names, sd)]
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    if cov[i, j] != 0.0 or cov[j, i] != 0.0:
                        corr = cov[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else float("nan")
                        out.append({"group": group, "term1": names[i], "term2": names[j], "corr": float(corr)})
        return out

    def varcorr(self) -> pd.DataFrame:
        """The variance components as R's ``as.data.frame(VarCorr(m))`` (see :func:`fedglmm.variance.varcorr`)."""
        from .variance import varcorr

        return varcorr(self)

    def icc(self) -> pd.Series:
        """The adjusted and conditional ICC of Nakagawa et al. (2017) (see :func:`fedglmm.variance.icc`)."""
        from .variance import icc

        return icc(self)

    # --- fit criteria -----------------------------------------------------------------------------
    @property
    def deviance(self) -> float:
        return -2.0 * self.loglik

    @property
    def aic(self) -> float:
        return -2.0 * self.loglik + 2.0 * self.n_params

    @property
    def bic(self) -> float:
        return -2.0 * self.loglik + np.log(self.nobs) * self.n_params

    # --- random effects and prediction -------------------------------------------------------------
    def ranef(self, condvar: bool = False, kind: str = "mode", by_factor: bool = False):
        """Conditional modes of the random effects (a DataFrame indexed by group level), or with
        ``kind="mean"`` their posterior means (adaptive Gauss-Hermite quadrature at each site, one round;
        for gaussian models the same as the modes).

        With ``condvar=True`` returns ``(modes, conditional_sds)`` (posterior SDs for ``kind="mean"``).
        Groups whose site withheld their modes (groups below its ``min_group``, see
        :class:`fedglmm.site.SiteConfig`) have NaN rows; their labels are :attr:`withheld`.  With several
        grouping factors (or ``by_factor=True``) each is a dict {factor: DataFrame}, as lme4's ``ranef``.
        """
        if self.modes is None:
            raise ValueError("this model has no random effects")
        if kind == "mean" and isinstance(self.modes, dict):
            raise ValueError("posterior means need a single grouping factor")
        if kind == "mean":
            from .analysis import posterior_means

            mean, sd = posterior_means(self)
            return (mean, sd) if condvar else mean
        if kind != "mode":
            raise ValueError("kind must be 'mode' or 'mean'")
        modes, sds = self.modes, self.condsd
        if by_factor and not isinstance(modes, dict):
            modes, sds = {self.group_name: modes}, {self.group_name: sds}
        return (modes, sds) if condvar else modes

    def diagnose(self, seed: int = 0):
        """The diagnostics round: residual aggregates from every site, pooled (see
        :class:`fedglmm.coordinator.diagnostics.Diagnostics`); the summary then shows the scaled residuals."""
        from .analysis import diagnose

        return diagnose(self, seed)

    def plot(self, kind: str, **kw):
        """A matplotlib figure: ``"caterpillar"``, ``"forest"``, ``"residuals"`` or ``"convergence"``
        (see :mod:`fedglmm.plots`; needs ``pip install 'fedglmm[plot]'``)."""
        from .plots import plot

        return plot(self, kind, **kw)

    def refit_ml(self) -> "FitResult":
        """This REML fit refitted by maximum likelihood at its sites (itself if it is not REML)."""
        from .analysis import refit_ml

        return refit_ml(self)

    @property
    def after_fit(self) -> dict:
        """Rounds, bytes and seconds spent after the fit, by purpose (profile, diagnostics, refit, ...)."""
        if self.session is None or not hasattr(self.session, "link"):
            return {}
        u = self.session.link.usage
        return {k: {"rounds": u.rounds[k], "bytes_to_sites": u.bytes_to_sites[k],
                    "bytes_from_sites": u.bytes_from_sites[k], "seconds": u.seconds[k]} for k in u.rounds}

    @property
    def omitted(self) -> dict:
        """Rows each site left out for a missing value in a column the model uses (``na_action="omit"``)."""
        got = dict(self.schema.omitted) if self.schema is not None else {}
        return {str(s): int(got.get(str(s), 0)) for s in self.site_ids} if self.site_ids else got

    @property
    def withheld(self) -> list | dict:
        """Group levels whose conditional modes their site did not send (its ``min_group`` rule); with
        several grouping factors a dict {factor: levels}."""
        if self.modes is None:
            return []
        if isinstance(self.modes, dict):
            return {g: list(m.index[m.isna().all(axis=1).to_numpy()]) for g, m in self.modes.items()
                    if m.isna().all(axis=1).any()}
        return list(self.modes.index[self.modes.isna().all(axis=1).to_numpy()])

    def predict(self, newdata: pd.DataFrame | None = None, type: str = "link", conditional: bool = True
                ) -> pd.Series:
        """Predictions for new rows, a Series indexed like ``newdata``: on the link scale (lme4's default) or
        ``type="response"`` (the mean).

        ``conditional=True`` adds each row's group's conditional mode, for every grouping factor (0 for a
        level not in the fit, as lme4's ``allow.new.levels``, and 0 for a group whose modes were withheld:
        with one factor its rows get the population-level prediction); ``False`` gives the
        population-level prediction.
        Stateful transforms (``scale(x)``, ``poly(x, 2)``, ...) use the fit's pooled state; a row lacking a
        value gives NaN.  Without ``newdata``: an error saying how a site gets its own fitted values (they
        never leave it).
        """
        from .prediction import Predictor

        return Predictor.from_result(self).predict(newdata, type=type, conditional=conditional)

    # --- output -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the fit (no row-level value: the modes are per group)."""
        out = {
            "formula": self.formula, "family": self.family.name, "link": self.family.link,
            "method": self.method, "nagq": self.nagq, "reml": self.reml,
            "fixef": _fdict(self.fixef), "se": _fdict(self.se),
            ("z" if self.df is None else "t"): _fdict(self.zvalues), "p": _fdict(self.pvalues),
            "conf_int": {k: [float(a), float(b)] for k, (a, b) in self.conf_int().iterrows()},
            "vcov": self.vcov.to_numpy().tolist(),
            "random": self.random, "residual_sd": self.residual_sd,
            "loglik": self.loglik, "deviance": self.deviance, "aic": self.aic, "bic": self.bic,
            "npar": self.n_params, "nobs": self.nobs, "ngroups": self.ngroups, "nsites": self.nsites,
            "rounds": self.rounds, "bytes_to_sites": self.bytes_to_sites,
            "bytes_from_sites": self.bytes_from_sites, "converged": self.converged,
            "seconds": self.seconds, "messages": list(self.messages), "sites": list(self.site_ids),
            "omitted": self.omitted,
            "secure_aggregation": self.secure_aggregation,
        }
        if self.df is not None:
            out["df"] = _fdict(self.df)
        if self.dispersion is not None:
            out["dispersion"] = {k: float(v) for k, v in self.dispersion.items()}
        for level, tab in self.profiles.items():
            out.setdefault("profile", {})[f"{level:g}"] = {
                "intervals": {str(k): [float(a), float(b)] for k, (a, b) in tab.iterrows()},
                "rounds": tab.attrs.get("rounds")}
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics.to_dict()
        if self.after_fit:
            out["after_fit"] = self.after_fit
        if self.schema is not None:           # what prediction needs: levels and the transforms' pooled state
            out["schema"] = {"kinds": dict(self.schema.kinds), "levels": dict(self.schema.levels),
                             "transforms": dict(self.schema.transforms)}
        if self.modes is not None:
            modes, sds = self.ranef(condvar=True, by_factor=True)
            out["ranef"] = {g: {str(lv): {"mode": _fdict(m.loc[lv]), "condsd": _fdict(sds[g].loc[lv])}
                                for lv in m.index} for g, m in modes.items()}
            withheld = self.withheld if isinstance(self.withheld, dict) else {self.group_name: self.withheld}
            withheld = {g: [str(lv) for lv in lvs] for g, lvs in withheld.items() if lvs}
            if withheld:
                out["withheld"] = withheld
        return out

    def to_json(self, path=None, indent: int = 2) -> str:
        """Strict JSON (a value that is not finite is written as null)."""
        text = json.dumps(_finite(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def summary(self, correlation: bool = False) -> str:
        """The summary as lme4 prints it; ``correlation=True`` adds the correlation of the fixed effects."""
        from .summary import format_summary

        return format_summary(self, correlation=correlation)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (f"<FitResult {self.family.name}/{self.family.link} {self.method}: logLik {self.loglik:.3f}, "
                f"{self.nobs} obs, {self.nsites} sites, {self.rounds} rounds>")


def _finite(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fdict(series: pd.Series) -> dict:
    return {str(k): float(v) for k, v in series.items()}
