"""The fitted model: coefficient table, variance components, fit criteria, conditional modes, predictions.

A :class:`FitResult` is what the coordinator ends with; it holds no row of any site.  Wald statistics use
the normal distribution (z and Pr(>|z|), as lme4 reports for GLMMs); intervals are Wald intervals
β̂ ± z_{1−α/2}·SE.  AIC = −2ℓ + 2k and BIC = −2ℓ + k log n with k counting the fixed effects, the
random-effect covariance parameters and, for gaussian models, the residual variance (lme4's ``df``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from .model.families import Family
from .model.spec import ModelSpec, Schema


@dataclass(frozen=True)
class RunStats:
    """How a fit ran: rounds, bytes each way, seconds, and the sites it ran over."""

    rounds: int
    bytes_to_sites: int
    bytes_from_sites: int
    seconds: float
    site_ids: tuple

    @classmethod
    def of(cls, transport, t0: float) -> "RunStats":
        """The transport's counts so far, and the time since ``t0`` (``time.perf_counter()``)."""
        return cls(transport.rounds, transport.bytes_to_sites, transport.bytes_from_sites,
                   time.perf_counter() - t0, tuple(transport.site_ids))


@dataclass
class FitResult:
    formula: str
    family: Family
    method: str
    nagq: int
    reml: bool
    fixef: pd.Series
    vcov: pd.DataFrame
    cov_re: pd.DataFrame | None          # covariance of the random effects (data scale)
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
    modes: pd.DataFrame | None = None     # conditional modes, one row per group level
    condsd: pd.DataFrame | None = None    # their conditional standard deviations
    theta: np.ndarray | None = None
    spec: ModelSpec | None = None
    schema: Schema | None = None
    messages: list = field(default_factory=list)
    site_ids: list = field(default_factory=list)

    @classmethod
    def build(cls, parts, run: RunStats) -> "FitResult":
        """The result, built once from the assembled fit (:class:`fedglmm.coordinator.assemble.Assembled`)
        and how it ran."""
        fields_ = {f: getattr(parts, f) for f in parts.__dataclass_fields__}
        return cls(**fields_, nsites=len(run.site_ids), rounds=run.rounds, bytes_to_sites=run.bytes_to_sites,
                   bytes_from_sites=run.bytes_from_sites, seconds=run.seconds, site_ids=list(run.site_ids))

    # --- coefficients -----------------------------------------------------------------------------
    @property
    def se(self) -> pd.Series:
        return pd.Series(np.sqrt(np.diag(self.vcov.to_numpy())), index=self.fixef.index)

    @property
    def zvalues(self) -> pd.Series:
        return self.fixef / self.se

    @property
    def pvalues(self) -> pd.Series:
        # 2 Φ(−|z|) = erfc(|z| / √2)
        return pd.Series([math.erfc(abs(z) / math.sqrt(2.0)) for z in self.zvalues.to_numpy()],
                         index=self.fixef.index)

    def conf_int(self, level: float = 0.95) -> pd.DataFrame:
        """Wald confidence intervals for the fixed effects."""
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        lo, hi = self.fixef - z * self.se, self.fixef + z * self.se
        pct = f"{100 * (1 - level) / 2:g} %", f"{100 * (1 + level) / 2:g} %"
        return pd.DataFrame({pct[0]: lo, pct[1]: hi})

    def coef_table(self, level: float = 0.95) -> pd.DataFrame:
        ci = self.conf_int(level)
        tab = pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.se, "z value": self.zvalues,
                            "Pr(>|z|)": self.pvalues})
        return pd.concat([tab, ci], axis=1)

    # --- variance components ---------------------------------------------------------------------
    @property
    def random(self) -> list[dict]:
        """lme4's ``VarCorr``: ``{group, term, sd}`` rows, then ``{group, term1, term2, corr}`` rows."""
        if self.cov_re is None:
            return []
        cov = self.cov_re.to_numpy()
        names = list(self.cov_re.index)
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        out = [{"group": self.group_name, "term": n, "sd": float(s)} for n, s in zip(names, sd)]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if cov[i, j] != 0.0 or cov[j, i] != 0.0:
                    corr = cov[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else float("nan")
                    out.append({"group": self.group_name, "term1": names[i], "term2": names[j],
                                "corr": float(corr)})
        return out

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
    def ranef(self, condvar: bool = False):
        """Conditional modes of the random effects (a DataFrame indexed by group level).

        With ``condvar=True`` returns ``(modes, conditional_sds)``.  Groups whose site withheld their modes
        (groups below its ``min_group``, see :class:`fedglmm.site.SiteConfig`) have NaN rows; their
        labels are :attr:`withheld`.
        """
        if self.modes is None:
            raise ValueError("this model has no random effects")
        return (self.modes, self.condsd) if condvar else self.modes

    @property
    def omitted(self) -> dict:
        """Rows each site left out for a missing value in a column the model uses (``na_action="omit"``)."""
        got = dict(self.schema.omitted) if self.schema is not None else {}
        return {str(s): int(got.get(str(s), 0)) for s in self.site_ids} if self.site_ids else got

    @property
    def withheld(self) -> list:
        """Group levels whose conditional modes their site did not send (its ``min_group`` rule)."""
        if self.modes is None:
            return []
        return list(self.modes.index[self.modes.isna().all(axis=1).to_numpy()])

    def predict(self, newdata: pd.DataFrame, conditional: bool = True, type: str = "link") -> np.ndarray:
        """Predictions for new rows: on the link scale (lme4's default) or ``type="response"``.

        ``conditional=True`` adds each row's group's conditional mode (0 for a level not in the fit, as
        lme4's ``allow.new.levels``, and 0 for a group whose modes were withheld: its rows get the
        population-level prediction); ``False`` gives the population-level prediction.
        """
        from .model.design import new_data_matrices

        if type not in ("link", "response"):
            raise ValueError("type must be 'link' or 'response'")
        cond = conditional and self.modes is not None
        X, Z, offset, groups = new_data_matrices(self.spec, self.schema, newdata, need_group=cond)
        eta = X @ self.fixef.to_numpy() + offset
        if cond:
            b = self.modes.reindex(pd.Index(groups[self.group_name], dtype=object)).fillna(0.0).to_numpy()
            eta = eta + np.sum(Z * b, axis=1)
        return eta if type == "link" else self.family.mean(eta)

    # --- output -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the fit (no row-level value: the modes are per group)."""
        out = {
            "formula": self.formula, "family": self.family.name, "link": self.family.link,
            "method": self.method, "nagq": self.nagq, "reml": self.reml,
            "fixef": _fdict(self.fixef), "se": _fdict(self.se),
            "z": _fdict(self.zvalues), "p": _fdict(self.pvalues),
            "conf_int": {k: [float(a), float(b)] for k, (a, b) in self.conf_int().iterrows()},
            "vcov": self.vcov.to_numpy().tolist(),
            "random": self.random, "residual_sd": self.residual_sd,
            "loglik": self.loglik, "deviance": self.deviance, "aic": self.aic, "bic": self.bic,
            "df": self.n_params, "nobs": self.nobs, "ngroups": self.ngroups, "nsites": self.nsites,
            "rounds": self.rounds, "bytes_to_sites": self.bytes_to_sites,
            "bytes_from_sites": self.bytes_from_sites, "converged": self.converged,
            "seconds": self.seconds, "messages": list(self.messages), "sites": list(self.site_ids),
            "omitted": self.omitted,
        }
        if self.modes is not None:
            out["ranef"] = {self.group_name: {
                str(lv): {"mode": _fdict(self.modes.loc[lv]), "condsd": _fdict(self.condsd.loc[lv])}
                for lv in self.modes.index}}
            if self.withheld:
                out["withheld"] = {self.group_name: [str(lv) for lv in self.withheld]}
        return out

    def to_json(self, path=None, indent: int = 2) -> str:
        """Strict JSON (a value that is not finite is written as null)."""
        text = json.dumps(_finite(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def summary(self) -> str:
        from .summary import format_summary

        return format_summary(self)

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
