"""Simulated multi-site data with known truth.

The eight settings ``s1``..``s8`` reproduce the simulation design of the federated-GLMM study this project
is seeded from: a binary outcome, a random intercept per site and *no* fixed intercept. Ten covariates,
X1-X4 ~ Bernoulli(0.5) and X5-X10 ~ Uniform(-1, 1.5), with

    beta = (-1.5, 0.1, -0.5, -0.3, 0.4, -0.2, -0.25, 0.35, -0.1, 0.5)
    eta  = X beta + b_site,   b_site ~ N(0, intercept_var),   y ~ Bernoulli(expit(eta)).

The grid is patients per site in {500, 30} x sites in {2, 10} x intercept variance in {1, 4}, in that
order: s1 = (500, 2 sites, var 1), s2 = (500, 2, 4), s3 = (500, 10, 1), ..., s8 = (30, 10, 4).

Extra settings the seed lacks: ``pois`` (Poisson, log link, beta scaled by 0.5), ``gauss`` (Gaussian,
residual sd 1), ``nested`` (a correlated random slope on X5: sd 0.5, correlation 0.3 with the intercept)
and ``many`` (50 sites x 100 patients).

Everything is deterministic for a seed (``numpy.random.default_rng``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

__all__ = ["Setting", "SETTINGS", "BETA", "COVARIATES", "simulate", "formula", "train_validation",
           "random_effects"]

BETA: tuple[float, ...] = (-1.5, 0.1, -0.5, -0.3, 0.4, -0.2, -0.25, 0.35, -0.1, 0.5)
COVARIATES: tuple[str, ...] = tuple(f"X{j}" for j in range(1, 11))
_BINARY = 4  # X1..X4 are Bernoulli(0.5); the rest Uniform(-1, 1.5)
_FAMILIES = ("binomial", "poisson", "gaussian")


@dataclass(frozen=True)
class Setting:
    """One simulation setting.

    ``intercept_var`` is the random-intercept *variance*; ``slope_sd`` the random-slope standard deviation
    on ``slope_on`` (0 = no random slope), correlated ``slope_corr`` with the intercept; ``sigma`` is the
    residual sd (gaussian only).
    """

    sites: int
    patients: int
    intercept_var: float
    family: str = "binomial"
    beta: tuple[float, ...] = BETA
    slope_sd: float = 0.0
    slope_corr: float = 0.0
    slope_on: str = "X5"
    sigma: float = 1.0

    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ValueError(f"family must be one of {_FAMILIES}, got {self.family!r}")
        if len(self.beta) != len(COVARIATES):
            raise ValueError(f"beta needs {len(COVARIATES)} coefficients, got {len(self.beta)}")
        if self.sites < 1 or self.patients < 1:
            raise ValueError("sites and patients must be positive")
        if self.intercept_var < 0 or self.slope_sd < 0 or self.sigma <= 0:
            raise ValueError("variances and standard deviations must be non-negative (sigma positive)")
        if not -1 <= self.slope_corr <= 1:
            raise ValueError("slope_corr must lie in [-1, 1]")
        if self.slope_on not in COVARIATES:
            raise ValueError(f"slope_on must be one of {COVARIATES}")

    @property
    def site_ids(self) -> list[str]:
        return [f"site{i}" for i in range(1, self.sites + 1)]

    @property
    def covariance(self) -> np.ndarray:
        """Covariance of (intercept, slope) random effects; 1x1 without a slope."""
        if self.slope_sd == 0:
            return np.array([[self.intercept_var]])
        s0, s1 = np.sqrt(self.intercept_var), self.slope_sd
        c = self.slope_corr * s0 * s1
        return np.array([[s0 * s0, c], [c, s1 * s1]])


def _grid() -> dict[str, Setting]:
    out, k = {}, 1
    for patients in (500, 30):  # s1-s4: 500 per site, s5-s8: 30 per site
        for sites in (2, 10):
            for var in (1.0, 4.0):
                out[f"s{k}"] = Setting(sites=sites, patients=patients, intercept_var=var)
                k += 1
    return out


SETTINGS: dict[str, Setting] = {
    **_grid(),
    "pois": Setting(sites=10, patients=500, intercept_var=1.0, family="poisson",
                    beta=tuple(0.5 * b for b in BETA)),
    "gauss": Setting(sites=10, patients=500, intercept_var=1.0, family="gaussian", sigma=1.0),
    "nested": Setting(sites=10, patients=500, intercept_var=1.0, slope_sd=0.5, slope_corr=0.3),
    "many": Setting(sites=50, patients=100, intercept_var=1.0),
}


def _resolve(setting: Setting | str) -> Setting:
    if isinstance(setting, Setting):
        return setting
    try:
        return SETTINGS[setting]
    except KeyError:
        raise KeyError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}") from None


def formula(setting: Setting | str) -> str:
    """Model formula for a setting, e.g. ``"y ~ 0 + X1 + ... + X10 + (1 | site)"``."""
    s = _resolve(setting)
    random = f"(1 + {s.slope_on} | site)" if s.slope_sd > 0 else "(1 | site)"
    return "y ~ 0 + " + " + ".join(COVARIATES) + " + " + random


def _draw_effects(s: Setting, rng: np.random.Generator) -> np.ndarray:
    """Site random effects, shape (sites, 1 or 2); the first draws of ``simulate``'s stream.

    Uses an eigen-root, so a singular covariance (variance 0, |corr| = 1) is fine.
    """
    cov = s.covariance
    w, v = np.linalg.eigh(cov)
    return rng.standard_normal((s.sites, cov.shape[0])) @ (v * np.sqrt(np.clip(w, 0.0, None))).T


def simulate(setting: Setting | str, seed: int = 1) -> dict[str, pd.DataFrame]:
    """Simulate one data set: ``{"site1": frame, ...}``, columns ``y, X1..X10, site``.

    Random effects for all sites are drawn first, then each site's covariates and outcome in site order,
    all from one ``default_rng(seed)`` stream.
    """
    s = _resolve(setting)
    rng = np.random.default_rng(seed)
    b = _draw_effects(s, rng)
    q = b.shape[1]
    beta = np.asarray(s.beta, dtype=float)
    slope_col = COVARIATES.index(s.slope_on)
    frames: dict[str, pd.DataFrame] = {}
    for i, sid in enumerate(s.site_ids):
        n = s.patients
        X = np.empty((n, len(COVARIATES)))
        X[:, :_BINARY] = rng.binomial(1, 0.5, (n, _BINARY))
        X[:, _BINARY:] = rng.uniform(-1.0, 1.5, (n, len(COVARIATES) - _BINARY))
        eta = X @ beta + b[i, 0]
        if q == 2:
            eta = eta + b[i, 1] * X[:, slope_col]
        if s.family == "binomial":
            y = rng.binomial(1, special.expit(eta)).astype(np.int64)
        elif s.family == "poisson":
            y = rng.poisson(np.exp(eta)).astype(np.int64)
        else:
            y = eta + s.sigma * rng.standard_normal(n)
        df = pd.DataFrame(X, columns=list(COVARIATES))
        for j in range(_BINARY):
            df[COVARIATES[j]] = df[COVARIATES[j]].astype(np.int64)
        df.insert(0, "y", y)
        df["site"] = sid
        frames[sid] = df
    return frames


def random_effects(setting: Setting | str, seed: int = 1) -> pd.DataFrame:
    """The true random effects ``simulate(setting, seed)`` used, one row per site."""
    s = _resolve(setting)
    b = _draw_effects(s, np.random.default_rng(seed))
    cols = ["intercept"] + ([s.slope_on] if b.shape[1] == 2 else [])
    return pd.DataFrame(b, index=s.site_ids, columns=cols)


def train_validation(frames: dict[str, pd.DataFrame], fraction: float = 0.3, seed: int = 1
                     ) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Split each site's rows at random into training (1 - fraction) and validation (fraction).

    The default is the seed study's 7:3 split. The validation part of a site has ``round(fraction * n)``
    rows; row order within each part follows the original frame. Returns ``(train, validation)``.
    """
    if not 0 <= fraction <= 1:
        raise ValueError("fraction must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    train, valid = {}, {}
    for sid, df in frames.items():
        n = len(df)
        k = int(round(fraction * n))
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:k]] = True
        train[sid] = df.iloc[~mask]
        valid[sid] = df.iloc[mask]
    return train, valid

