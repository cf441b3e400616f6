"""Families with a dispersion parameter: the negative binomial (glmmTMB's ``nbinom2``) and Gamma.

The GLMM engine estimates the dispersion by maximum likelihood jointly with β and θ, as one more
coordinate ψ of the parameter vector, on a log scale (glmmTMB's ``betad``):

* **negative binomial** (log link): Var(y) = μ + μ²/ϑ with ϑ = e^ψ (glmmTMB's ``sigma()``, "theta"):

      ℓ = m [ϑ log(ϑ/s) + y log(μ/s) + log Γ(y + ϑ) − log Γ(ϑ)] − m log y!,    s = ϑ + μ;

  written with r = μ/s = expit(η − ψ) and c = ϑ/s = 1 − r, every derivative stays finite for any μ, ϑ;
* **Gamma** (links inverse, R's default, log and identity): shape ν = e^ψ, CV 1/√ν (glmmTMB's ``sigma()``):

      ℓ = m [ν (ψ − log μ − y/μ + log y) − log Γ(ν)] − m log y.

m is the prior weight that multiplies each row's log-likelihood, as glmmTMB's ``weights``.  The
curvature in the Laplace determinant is always the observed one, −∂²ℓ/∂η² (the exact Laplace
approximation glmmTMB computes); lme4's ``glmer.nb`` puts the expected information there, and its Gamma
fits evaluate the density at a plug-in dispersion, so glmmTMB is the reference for both.
Derivatives in ψ and the mixed ones are in :class:`~fedglmm.model.family.DispersionDerivs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InputError
from .family import DispersionDerivs, Family, count_level, special


def _softplus(x):
    """log(1 + eˣ), accurate in both tails."""
    return np.logaddexp(0.0, x)


# From ϑ = 50 on, the differences log Γ(y + ϑ) − log Γ(ϑ), ψ(y + ϑ) − ψ(ϑ) and ψ₁(y + ϑ) − ψ₁(ϑ) come from
# their asymptotic (Stirling) series, with every difference of powers formed without cancellation: as ϑ
# grows towards the poisson limit the direct differences of two large numbers lose every digit (at ϑ = 1e9
# the ψ-gradient's noise exceeded its value, and Newton wandered).  Truncation error < 1e-17 relative.
LARGE_THETA = 50.0


def _powdiff(th, y, k):
    """(ϑ + y)⁻ᵏ − ϑ⁻ᵏ without cancellation."""
    return th ** -k * np.expm1(-k * np.log1p(y / th))


def _log1pmx(x):
    """log(1 + x) − x without cancellation for small |x| (x > −1)."""
    x = np.asarray(x, float)
    small = np.abs(x) < 1e-2
    z = np.where(small, x, 0.0)
    series = z * z * (-1 / 2 + z * (1 / 3 + z * (-1 / 4 + z * (1 / 5 + z * (-1 / 6 + z * (1 / 7 - z / 8))))))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(small, series, np.log1p(x) - x)


def _large(th):
    return np.asarray(th, float) >= LARGE_THETA


def _lgamma_diff(y, th):
    """log Γ(y + ϑ) − log Γ(ϑ) − (y log y − y) (:func:`~fedglmm.model.family.count_level`; the negative binomial
    keeps that in its constant), written so that no large terms cancel: for a count of 3e4 each Γ term is
    3e5, and their rounding, which varies with ϑ from point to point, was 3e-8 of a logLik summed over 1000
    rows.  Large ϑ: Stirling's series in ϑ; y + ϑ ≥ STIRLING_X: Stirling's series in y + ϑ,
    y log(1 + ϑ/y) + (ϑ − ½) log(y + ϑ) − ϑ + ½ log 2π + S(y + ϑ) − log Γ(ϑ); else the Γ terms as they are."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        y, th = np.asarray(y, float), np.asarray(th, float)
        pos = y > 0
        yp = np.where(pos, y, 1.0)
        t = np.maximum(th, LARGE_THETA)
        asym = _asymptotic_rest(y, t) + np.where(pos, y * np.log1p(t / yp), 0.0)
        x = np.maximum(y + th, STIRLING_X)
        stirling = np.where(pos, y * np.log1p(th / yp), 0.0) + (th - 0.5) * np.log(x) - th + 0.5 * np.log(2 * np.pi) \
            + _stirling_rest(x) - special.gammaln(th)
        plain = special.gammaln(y + th) - special.gammaln(th) - count_level(y)
        return np.where(_large(th), asym, np.where(y + th >= STIRLING_X, stirling, plain))


def _asymptotic_rest(y, t):
    """log Γ(y + ϑ) − log Γ(ϑ) − (y log y − y) − y log(1 + ϑ/y) for ϑ = t ≥ LARGE_THETA: Stirling's series in ϑ."""
    return (t - 0.5) * np.log1p(y / t) + _powdiff(t, y, 1) / 12 - _powdiff(t, y, 3) / 360 + _powdiff(t, y, 5) / 1260 \
        - _powdiff(t, y, 7) / 1680


STIRLING_X = 20.0


def _shape_term(nu, psi):
    """ν ψ − ν − log Γ(ν) (ψ = log ν): from ν = STIRLING_X, ½ (ψ − log 2π) − S(ν) by Stirling's series."""
    x = np.maximum(nu, STIRLING_X)
    return np.where(nu >= STIRLING_X, 0.5 * (psi - np.log(2 * np.pi)) - _stirling_rest(x),
                    nu * psi - nu - special.gammaln(nu))


def _stirling_rest(x):
    """log Γ(x) − ((x − ½) log x − x + ½ log 2π): Stirling's series, to 1e-17 for x ≥ 20."""
    r = 1.0 / (x * x)
    return (1.0 / 12 - r * (1.0 / 360 - r * (1.0 / 1260 - r * (1.0 / 1680 - r / 1188)))) / x


def _digamma_rest(y, th):
    """ψ(y + ϑ) − ψ(ϑ) − log(1 + y/ϑ) for large ϑ (the asymptotic series' corrections)."""
    return -_powdiff(th, y, 1) / 2 - _powdiff(th, y, 2) / 12 + _powdiff(th, y, 4) / 120 \
        - _powdiff(th, y, 6) / 252 + _powdiff(th, y, 8) / 240 - _powdiff(th, y, 10) / 132


def _trigamma_rest(y, th):
    """ψ₁(y + ϑ) − ψ₁(ϑ) − [(ϑ + y)⁻¹ − ϑ⁻¹] for large ϑ."""
    return _powdiff(th, y, 2) / 2 + _powdiff(th, y, 3) / 6 - _powdiff(th, y, 5) / 30 \
        + _powdiff(th, y, 7) / 42 - _powdiff(th, y, 9) / 30


@dataclass(frozen=True)
class DispersionFamily(Family):
    """What the families with a dispersion parameter share: one more parameter ψ, the observed curvature."""

    ndisp: ClassVar[int] = 1
    dispersion_name: ClassVar[str] = ""     # the reported parameter: "theta" or "sigma"
    display: ClassVar[str] = ""             # the family's name as glmmTMB prints it

    def dispersion(self, psi: float) -> float:
        """The reported dispersion parameter at ψ."""
        raise NotImplementedError

    def dispersion_slope(self, psi: float) -> float:
        """d(reported dispersion)/dψ, for its standard error by the delta method."""
        raise NotImplementedError

    def curvature(self, y, m, eta, kind: str = "observed", psi=None):
        d2 = self.derivs(y, m, eta, psi)[1]
        d3 = self.derivs2(y, m, eta, psi)[0]
        return -d2, -d3, -self.d4(y, m, eta, psi)


@dataclass(frozen=True)
class NegativeBinomial(DispersionFamily):
    """glmmTMB's ``nbinom2`` with log link: Var(y) = μ + μ²/ϑ, ψ = log ϑ."""

    dispersion_name: ClassVar[str] = "theta"
    display: ClassVar[str] = "nbinom2"

    def dispersion(self, psi):
        return float(np.exp(psi))

    def dispersion_slope(self, psi):
        return float(np.exp(psi))

    def validate(self, y, trials, where: str = "", row=None, proportion: bool = False) -> None:
        at = f" {where}" if where else ""
        row = row or (lambda i: f"row {i + 1}")
        y = np.asarray(y, dtype=float)
        bad = ~np.isfinite(y) | (y < 0) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"negative binomial outcome must be a non-negative whole count{at}: "
                             f"found {y[i]:g} in {row(i)}")

    def constant(self, y, trials) -> float:
        """−Σ log y!, and y log y − y, which :meth:`loglik` leaves out (as the poisson family's)."""
        return float(np.sum(trials * (count_level(y) - special.gammaln(y + 1))))

    @staticmethod
    def _rc(eta, psi):
        return special.expit(eta - psi), special.expit(psi - eta)

    def loglik(self, y, m, eta, psi=None):
        th = np.exp(psi)
        large = _large(th)
        # each form only where it is used (ψ is one number: one form; computing both cost the modes' solves 1.4
        # times the time)
        if not np.any(large):
            return m * self._direct(y, eta, psi, th)
        if np.all(large):
            return m * self._near_limit(y, eta, psi, th)
        return m * np.where(large, self._near_limit(y, eta, psi, th), self._direct(y, eta, psi, th))

    @staticmethod
    def _direct(y, eta, psi, th):
        # less y log y − y (in the constant): counts of 3e4 have terms of 3e5 here that cancel to 1e2, and
        # their sum lost 3e-8 of the logLik, depending on how the rows were split
        return -th * _softplus(eta - psi) - y * _softplus(psi - eta) + _lgamma_diff(y, th)

    @staticmethod
    def _near_limit(y, eta, psi, th):
        # large ϑ: y log(1 + ϑ/y) − y log(1 + ϑ/μ) as y (log(μ/y) + log((ϑ + y)/(ϑ + μ))), small where μ
        # is near y, and ϑ log(1 + μ/ϑ) as μ log(1 + x)/x, x = μ/ϑ, whose error is x's: the two terms, each y ψ,
        # and η − ψ's rounding (1e-14 at ψ = 100) in x lost 1e-10 of a count of 2e4's ℓ at ϑ = 1e20 and 4e-10 at
        # 1e45 (poisson-like counts, where ψ heads to its limit: tests/test_dispersion.py)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            t = np.maximum(th, LARGE_THETA)
            yp = np.where(y > 0, y, 1.0)
            x, mu = np.exp(eta - np.maximum(psi, np.log(LARGE_THETA))), np.exp(eta)
            return np.where(y > 0, y * (np.log1p((mu - y) / yp) + np.log1p((y - mu) / (t + mu))), 0.0) \
                + _asymptotic_rest(y, t) - mu * np.where(x > 0, np.log1p(x) / np.where(x > 0, x, 1.0), 1.0)

    def derivs(self, y, m, eta, psi=None):
        """(d1, d2, w, w1); without ψ (starting values) the poisson limit ϑ → ∞."""
        if psi is None:
            mu = m * np.exp(eta)
            return m * y - mu, -mu, mu, mu
        th = np.exp(psi)
        r, c = self._rc(eta, psi)
        w = m * th * r                                  # Fisher weight μϑ/(ϑ + μ)
        return m * (y * c - th * r), -m * (th + y) * r * c, w, w * c

    def derivs2(self, y, m, eta, psi=None):
        th = np.exp(psi)
        r, c = self._rc(eta, psi)
        return -m * (th + y) * r * c * (c - r), m * th * r * c * (c - r)

    def d4(self, y, m, eta, psi=None):
        th = np.exp(psi)
        r, c = self._rc(eta, psi)
        return -m * (th + y) * r * c * (c * c - 4.0 * r * c + r * r)

    @staticmethod
    def _psi_derivs(y, m, eta, psi, mu, th, r, c):
        """∂ℓ/∂ψ and ∂²ℓ/∂ψ².  With s = ϑ + μ and x = (y − μ)/s, ∂ℓ/∂ψ = mϑ[log(1 + x) − x + ψ(y + ϑ) − ψ(ϑ) −
        log(1 + y/ϑ)]; for large ϑ each term is formed without cancellation (see ``LARGE_THETA``), and
        y c² + ϑ²[ψ₁(y + ϑ) − ψ₁(ϑ)] as ϑ² [y (ϑ(y − 2μ) − μ²) / (s² ϑ (ϑ + y)) + the series' rest]."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            p1 = m * (-th * _softplus(eta - psi) + c * (mu - y)
                      + th * (special.digamma(y + th) - special.digamma(th)))
            tail = y * c * c + th * th * (special.polygamma(1, y + th) - special.polygamma(1, th))
            t = np.maximum(th, LARGE_THETA)
            s = t + mu
            p1_big = m * t * (_log1pmx((y - mu) / s) + _digamma_rest(y, t))
            tail_big = t * t * (y * (t * (y - 2.0 * mu) - mu * mu) / (s * s * t * (t + y)) + _trigamma_rest(y, t))
        big = _large(th)
        p1 = np.where(big, p1_big, p1)
        return p1, p1 + m * (th * r * r + np.where(big, tail_big, tail))

    def dispersion_derivs(self, y, m, eta, psi) -> DispersionDerivs:
        th = np.exp(psi)
        r, c = self._rc(eta, psi)
        mu = np.exp(eta)
        p1, pp = self._psi_derivs(y, m, eta, psi, mu, th, r, c)
        d1p = m * r * (y * c - th * r)
        rc = m * r * c
        return DispersionDerivs(
            p1=p1, pp=pp, d1p=d1p, d1pp=d1p * (r - c),
            d2p=-rc * (2.0 * th * r + y * (r - c)),
            d3p=-rc * (3.0 * th * c + 2.0 * c * y - 2.0 * th * r - y * r - 3.0 * (th + y) * c * (c - r)),
            d2pp=-rc * (4.0 * th * r + r * y - 2.0 * c * y - 6.0 * th * r * c - 3.0 * c * r * y + 3.0 * c * c * y))


@dataclass(frozen=True)
class GammaFamily(DispersionFamily):
    """Gamma with shape ν = e^ψ (CV 1/√ν); links inverse, log, identity.

    With a(η) = log μ(η) and b(η) = 1/μ(η), ℓ = m[ν(ψ − a − y b + log y) − log Γ(ν)], so every η-derivative
    is −mν(a⁽ᵏ⁾ + y b⁽ᵏ⁾) and every mixed derivative with ψ equals the η-derivative itself."""

    dispersion_name: ClassVar[str] = "sigma"
    display: ClassVar[str] = "Gamma"

    @property
    def log_concave(self) -> bool:             # identity: ∂²ℓ/∂η² = mν(η − 2y)/η³ changes sign
        return self.link != "identity"

    @property
    def canonical(self) -> bool:
        return self.link == "inverse"

    @property
    def positive_eta(self) -> bool:            # inverse: μ = 1/η; identity: μ = η; both need η > 0
        return self.link != "log"

    def dispersion(self, psi):
        return float(np.exp(-0.5 * psi))

    def dispersion_slope(self, psi):
        return float(-0.5 * np.exp(-0.5 * psi))

    def validate(self, y, trials, where: str = "", row=None, proportion: bool = False) -> None:
        at = f" {where}" if where else ""
        row = row or (lambda i: f"row {i + 1}")
        y = np.asarray(y, dtype=float)
        bad = ~np.isfinite(y) | (y <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"Gamma outcome must be positive{at}: found {y[i]:g} in {row(i)}")

    def constant(self, y, trials) -> float:
        return float(-np.sum(trials * np.log(y)))

    def _ab(self, eta, k: int):
        """The k-th η-derivatives of a = log μ and b = 1/μ (k ≥ 1; k = 0: a and b)."""
        if self.link == "log":
            a = eta if k == 0 else (np.ones_like(eta) if k == 1 else np.zeros_like(eta))
            return a, (-1.0) ** k * np.exp(-eta)
        sign = -1.0 if self.link == "inverse" else 1.0          # a = ∓log η
        fact = [1.0, 1.0, -1.0, 2.0, -6.0][k]                    # d^k log η = fact / η^k (k ≥ 1)
        a = sign * (np.log(eta) if k == 0 else fact / eta ** k)
        if self.link == "inverse":                               # b = η
            b = eta if k == 0 else (np.ones_like(eta) if k == 1 else np.zeros_like(eta))
        else:                                                    # b = 1/η
            b = [1.0, -1.0, 2.0, -6.0, 24.0][k] / eta ** (k + 1)
        return a, b

    def _dk(self, y, m, eta, psi, k):
        a, b = self._ab(eta, k)
        return -m * np.exp(psi) * (a + y * b)

    def loglik(self, y, m, eta, psi=None):
        # ν (ψ − log μ − y/μ + log y) − log Γ(ν) as ν (log r − r + 1) + (ν ψ − ν − log Γ(ν)), r = y/μ: with a
        # small dispersion (CV 1 %: ν = 1e4) the first form's terms are 1e5 and cancel to 1, and a logLik
        # summed over 1500 rows moved by 1.4e-8 between two splits of the same data (5e-7 at ν = 1e6)
        b = self._ab(eta, 0)[1]
        nu = np.exp(psi)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = y * b
            near = np.abs(r - 1.0) < 0.5
            return m * (nu * np.where(near, _log1pmx(np.where(near, r - 1.0, 0.0)), np.log(r) - (r - 1.0))
                        + _shape_term(nu, psi))

    def derivs(self, y, m, eta, psi=None):
        """(d1, d2, w, w1); without ψ (starting values) the shape is 1."""
        psi = 0.0 if psi is None else psi
        nu = np.exp(psi)
        if self.link == "log":
            w, w1 = m * nu * np.ones_like(eta), np.zeros_like(eta)
        else:                                                    # inverse and identity: ν/η², −2ν/η³
            w, w1 = m * nu / eta ** 2, -2.0 * m * nu / eta ** 3
        return self._dk(y, m, eta, psi, 1), self._dk(y, m, eta, psi, 2), w, w1

    def derivs2(self, y, m, eta, psi=None):
        nu = np.exp(psi)
        w2 = np.zeros_like(eta) if self.link == "log" else 6.0 * m * nu / eta ** 4
        return self._dk(y, m, eta, psi, 3), w2

    def d4(self, y, m, eta, psi=None):
        return self._dk(y, m, eta, psi, 4)

    def dispersion_derivs(self, y, m, eta, psi) -> DispersionDerivs:
        nu = np.exp(psi)
        a, b = self._ab(eta, 0)
        p1 = m * nu * (psi - a - y * b + np.log(y) + 1.0 - special.digamma(nu))
        pp = p1 + m * nu * (1.0 - nu * special.polygamma(1, nu))
        d1, d2 = self._dk(y, m, eta, psi, 1), self._dk(y, m, eta, psi, 2)
        return DispersionDerivs(p1=p1, pp=pp, d1p=d1, d2p=d2, d3p=self._dk(y, m, eta, psi, 3), d1pp=d1, d2pp=d2)
