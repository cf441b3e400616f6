"""The family interface, and the classic families without a dispersion parameter (gaussian, binomial,
poisson) with their links.

For a row with outcome y, prior weight or trials m, linear predictor η and (families with a dispersion
parameter, :mod:`fedglmm.model.dispersion`) the log-dispersion ψ, a family gives

* ``loglik(y, m, η, ψ)``: log f(y | η, ψ) without the constant that depends on neither η nor ψ;
* ``constant(y, m)``: that constant (log binomial coefficient, −log y!; poisson also the saturated
  y log y − y, so that a row's term is of the size of its deviance), so that the sum is the full
  log-density, as lme4 and glmmTMB report it;
* ``derivs(y, m, η, ψ)``: ``d1 = ∂ℓ/∂η``, ``d2 = ∂²ℓ/∂η²`` (observed), the Fisher weight
  ``w = m μ'(η)² / V(μ)`` (the PIRLS weight lme4 uses in its Laplace determinant) and ``w1 = ∂w/∂η``;
  ``derivs2`` (``d3``, ``w2 = ∂²w/∂η²``) and ``d4``: the higher η-derivatives the Laplace Hessian needs;
* ``curvature(y, m, η, kind, ψ)``: the weight in the Laplace determinant and its η-derivatives;
* ``dispersion_derivs(y, m, η, ψ)``: the ψ- and mixed derivatives (:class:`DispersionDerivs`; families
  with ``ndisp == 1`` only);
* ``mean(η)``: the mean of y / m on the response scale.

What m means: binomial, the trials (times the prior weight); gaussian, the precision weight (row variance
σ²/m, as lmer); poisson, negative binomial and Gamma, the prior weight that multiplies the row's
log-likelihood (as glmmTMB).  It is 1 without weights.

Everything is written in η to stay finite in the tails (log1p, expm1, log Φ via ``scipy.special``).
The gaussian family is handled by the exact profiled likelihood in :mod:`fedglmm.likelihood.lmm`; its entry
here serves validation and prediction.  ``get_family`` (the registry) is in :mod:`fedglmm.model.families`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InputError


class _LazySpecial:
    """``scipy.special``, imported on first use: the logit and log links need none of it, and importing it
    costs a small fit a fifth of a second."""

    def __getattr__(self, name):
        from scipy import special as module

        return getattr(module, name)


special = _LazySpecial()



@dataclass(frozen=True)
class DispersionDerivs:
    """ψ- and mixed derivatives of a row's log-density ℓ(η, ψ) (ψ: the log-dispersion parameter).

    ``p1 = ∂ℓ/∂ψ``, ``pp = ∂²ℓ/∂ψ²``; ``d1p = ∂²ℓ/∂η∂ψ``, ``d2p = ∂³ℓ/∂η²∂ψ``, ``d3p = ∂⁴ℓ/∂η³∂ψ``;
    ``d1pp = ∂³ℓ/∂η∂ψ²``, ``d2pp = ∂⁴ℓ/∂η²∂ψ²``.  With the observed curvature w = −d2, the Laplace
    determinant's weight has w_ψ = −d2p, w_ηψ = −d3p and w_ψψ = −d2pp."""

    p1: np.ndarray
    pp: np.ndarray
    d1p: np.ndarray
    d2p: np.ndarray
    d3p: np.ndarray
    d1pp: np.ndarray
    d2pp: np.ndarray


@dataclass(frozen=True)
class Family:
    """A GLM family with a link; see the module docstring for what it computes.

    This class is the classic families (gaussian, binomial, poisson: no dispersion parameter in the
    GLMM engine, ``ndisp == 0``); :mod:`fedglmm.model.dispersion` subclasses it."""

    name: str
    link: str

    ndisp: ClassVar[int] = 0              # number of dispersion parameters the engine estimates
    log_concave: ClassVar[bool] = True    # ℓ concave in η for every y (the modes' Newton needs no guard)
    positive_eta: ClassVar[bool] = False  # the link bounds η: the likelihood is finite only where η > 0

    # --- response scale -------------------------------------------------------------------------
    def mean(self, eta: np.ndarray) -> np.ndarray:
        eta = np.asarray(eta, dtype=float)
        if self.link == "identity":
            return eta
        if self.link == "log":
            return np.exp(eta)
        if self.link == "logit":
            with np.errstate(over="ignore"):
                return 1.0 / (1.0 + np.exp(-eta))       # scipy's expit, without importing scipy.special
        if self.link == "probit":
            return special.ndtr(eta)
        if self.link == "cloglog":
            return -np.expm1(-np.exp(eta))
        if self.link == "inverse":
            return 1.0 / eta
        raise AssertionError(self.link)

    def linkfun(self, mu: np.ndarray) -> np.ndarray:
        mu = np.asarray(mu, dtype=float)
        if self.link == "identity":
            return mu
        if self.link == "log":
            return np.log(mu)
        if self.link == "logit":
            # scipy's logit: log(μ/(1 − μ)), and near ½, where that loses digits, log1p(s) − log1p(−s) with
            # s = 2μ − 1 (bit for bit, without importing scipy.special for a start value)
            s = 2.0 * (mu - 0.5)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where((mu < 0.3) | (mu > 0.65), np.log(mu / (1.0 - mu)), np.log1p(s) - np.log1p(-s))
        if self.link == "probit":
            return special.ndtri(mu)
        if self.link == "cloglog":
            return np.log(-np.log1p(-mu))
        if self.link == "inverse":
            return 1.0 / mu
        raise AssertionError(self.link)

    # --- validation -----------------------------------------------------------------------------
    def validate(self, y: np.ndarray, trials: np.ndarray, where: str = "", row=None, proportion: bool = False) -> None:
        """Raise :class:`InputError` if an outcome lies outside the family's support; ``row(i)`` names the
        i-th row in the message (default ``row i+1``).  ``proportion``: a binomial outcome given as a
        proportion of its trials (with ``weights``)."""
        at = f" {where}" if where else ""
        row = row or (lambda i: f"row {i + 1}")
        y = np.asarray(y, dtype=float)
        if not np.all(np.isfinite(y)):
            raise InputError(f"outcome has non-finite values{at}")
        if self.name == "binomial" and proportion:
            bad = (y < 0) | (y > 1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"binomial outcome with weights must be a proportion between 0 and 1{at}: "
                                 f"found {y[i]:g} in {row(i)}")
        elif self.name == "binomial":
            m = np.asarray(trials, dtype=float)
            bad = (y < 0) | (y != np.round(y)) | (y > m) | (m != np.round(m)) | (m < 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                if np.all(m == 1):
                    raise InputError(f"binomial outcome must be 0 or 1{at}: found {y[i]:g} in {row(i)}")
                raise InputError(
                    f"binomial outcome must be whole successes between 0 and trials{at}: "
                    f"found {y[i]:g} of {m[i]:g} in {row(i)}")
        elif self.name == "poisson":
            bad = (y < 0) | (y != np.round(y))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"poisson outcome must be a non-negative whole count{at}: "
                                 f"found {y[i]:g} in {row(i)}")

    # --- log-density ----------------------------------------------------------------------------
    def constant(self, y: np.ndarray, trials: np.ndarray) -> float:
        """Σ of the η-free part of log f(y) (binomial coefficient, −log y!)."""
        if self.name == "binomial":
            m = trials
            if np.all(m == 1.0) and np.all((y == 0.0) | (y == 1.0)):
                return 0.0                      # binary rows: every term is log 1
            return float(np.sum(special.gammaln(m + 1) - special.gammaln(y + 1) - special.gammaln(m - y + 1)
                                + binomial_level(y, m)))
        if self.name == "poisson":      # the saturated term y log y − y, which :meth:`loglik` leaves out
            return float(np.sum(trials * (count_level(y) - special.gammaln(y + 1))))
        return 0.0

    def dispersion_derivs(self, y, m, eta, psi) -> DispersionDerivs:
        """The ψ- and mixed derivatives (families with a dispersion parameter only)."""
        raise TypeError(f"the {self.name} family has no dispersion parameter")

    def loglik(self, y, m, eta, psi=None):
        """Row log-densities up to :meth:`constant`; works on any broadcastable shapes."""
        if self.name == "binomial":
            # less the row's value at μ = y/m (in :meth:`constant`; 0 for a 0/1 row): with 1e6 trials a row's
            # terms are 7e5 and their sum over 1200 rows cancelled to 1e4, losing 1e-7 of the logLik
            return self._binomial_loglik(y, m, eta) - binomial_level(y, m)
        if self.link == "log":
            # y η − e^η less its value at η = log y (in :meth:`constant`): a row's term is then of the size of
            # its deviance, not of y η, and their sum keeps its digits (counts of 3e4 lost 3e-8 of the
            # log-likelihood to the sum of terms of 3e5 that cancel).  e^η may overflow at a rejected trial
            # point: −inf, no warning
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                pos = y > 0
                dev = np.where(pos, y * (eta - np.log(np.where(pos, y, 1.0))), 0.0)
                return m * (dev - (np.exp(eta) - y))
        raise AssertionError(self.link)

    def _binomial_loglik(self, y, m, eta):
        if self.link == "logit":        # −(y log(1 + e^−η) + (m − y) log(1 + e^η)), exact in both tails
            t = np.log1p(np.exp(-np.abs(eta)))
            return -(m * t + y * np.maximum(-eta, 0.0) + (m - y) * np.maximum(eta, 0.0))
        if self.link == "probit":
            return _xlogy(y, special.log_ndtr(eta)) + _xlogy(m - y, special.log_ndtr(-eta))
        with np.errstate(over="ignore"):        # cloglog
            t = np.exp(eta)
            return _xlogy(y, _log1mexp(t)) - (m - y) * t

    def derivs(self, y, m, eta, psi=None):
        """(d1, d2, w, w1): first and second η-derivatives of ℓ, Fisher weight and its η-derivative."""
        if self.link == "logit":
            mu, cmu = _expit2(eta)        # μ and 1 − μ, each to full precision
            d1 = np.where(eta > 0, (y - m) + m * cmu, y - m * mu)
            w = m * mu * cmu
            return d1, -w, w, w * (cmu - mu)
        if self.link == "log":
            with np.errstate(over="ignore"):
                mu = m * np.exp(eta)
            return m * y - mu, -mu, mu, mu
        if self.link == "probit":
            logphi = -0.5 * eta * eta - 0.5 * np.log(2.0 * np.pi)
            lam1 = np.exp(logphi - special.log_ndtr(eta))    # φ/Φ(η)
            lam0 = np.exp(logphi - special.log_ndtr(-eta))   # φ/Φ(−η)
            d1 = y * lam1 - (m - y) * lam0
            d2 = -y * lam1 * (eta + lam1) - (m - y) * lam0 * (lam0 - eta)
            w = m * lam1 * lam0          # m φ² / (Φ (1 − Φ))
            return d1, d2, w, w * (lam0 - lam1 - 2.0 * eta)
        if self.link == "cloglog":
            with np.errstate(over="ignore"):
                t = np.exp(eta)
                em1 = np.expm1(t)
                a = t / em1                            # t / (e^t − 1)
                a2et = t * t / (em1 * -np.expm1(-t))   # a² e^t, finite for large t
                d1 = y * a - (m - y) * t
                d2 = y * (a - a2et) - (m - y) * t
                w = m * t * a
                return d1, d2, w, m * t * (2.0 * a - a2et)
        raise AssertionError(self.link)

    def derivs2(self, y, m, eta, psi=None):
        """(d3, w2): third η-derivative of ℓ and second η-derivative of the Fisher weight."""
        if self.link == "logit":
            mu, cmu = _expit2(eta)
            w = m * mu * cmu
            return -w * (cmu - mu), w * (1.0 - 6.0 * mu * cmu)
        if self.link == "log":
            mu = m * np.exp(eta)
            return -mu, mu
        if self.link == "probit":
            logphi = -0.5 * eta * eta - 0.5 * np.log(2.0 * np.pi)
            lam1 = np.exp(logphi - special.log_ndtr(eta))
            lam0 = np.exp(logphi - special.log_ndtr(-eta))
            da1 = lam1 * (1.0 - (eta + lam1) * (eta + 2.0 * lam1))      # d/dη [λ1 (η + λ1)]
            da0 = lam0 * ((lam0 - eta) * (2.0 * lam0 - eta) - 1.0)      # d/dη [λ0 (λ0 − η)]
            w = m * lam1 * lam0
            k = lam0 - lam1 - 2.0 * eta
            return -y * da1 - (m - y) * da0, w * (k * k + lam0 * (lam0 - eta) + lam1 * (eta + lam1) - 2.0)
        if self.link == "cloglog":
            with np.errstate(over="ignore"):
                t = np.exp(eta)
                a = t / np.expm1(t)
                b = t * t / (np.expm1(t) * -np.expm1(-t))     # a² e^t
                c = t / -np.expm1(-t)                          # b / a
                db = b * (2.0 - 2.0 * c + t)
                return y * (a - b - db) - (m - y) * t, m * t * (4.0 * a - 3.0 * b - db)
        raise AssertionError(self.link)

    @property
    def canonical(self) -> bool:
        """Canonical link: observed and expected information coincide."""
        return self.link in ("logit", "log", "identity")

    def curvature(self, y, m, eta, kind: str = "observed", psi=None):
        """(w, w1, w2): the curvature weight used in log det H and its first two η-derivatives.

        ``observed``: −∂²ℓ/∂η² (the exact Laplace approximation, as glmmTMB); ``expected``: the Fisher
        weight (lme4's PIRLS weight).  They coincide for canonical links.
        """
        d1, d2, w, w1 = self.derivs(y, m, eta)
        d3, w2 = self.derivs2(y, m, eta)
        if kind == "expected" or self.canonical:
            return w, w1, w2
        return -d2, -d3, -self.d4(y, m, eta)

    def d4(self, y, m, eta, psi=None):
        """Fourth η-derivative of ℓ (needed for the Hessian of the observed-curvature Laplace value)."""
        if self.link == "logit":
            mu, cmu = _expit2(eta)
            return -m * mu * cmu * (1.0 - 6.0 * mu * cmu)
        if self.link == "log":
            return -m * np.exp(eta)
        if self.link == "probit":
            logphi = -0.5 * eta * eta - 0.5 * np.log(2.0 * np.pi)
            lam1 = np.exp(logphi - special.log_ndtr(eta))
            lam0 = np.exp(logphi - special.log_ndtr(-eta))
            dl1, dl0 = -lam1 * (eta + lam1), lam0 * (lam0 - eta)
            k1, k0 = 1.0 - (eta + lam1) * (eta + 2.0 * lam1), (lam0 - eta) * (2.0 * lam0 - eta) - 1.0
            dda1 = dl1 * k1 - lam1 * ((1.0 + dl1) * (eta + 2.0 * lam1) + (eta + lam1) * (1.0 + 2.0 * dl1))
            dda0 = dl0 * k0 + lam0 * ((dl0 - 1.0) * (2.0 * lam0 - eta) + (lam0 - eta) * (2.0 * dl0 - 1.0))
            return -y * dda1 - (m - y) * dda0
        if self.link == "cloglog":
            with np.errstate(over="ignore"):
                t = np.exp(eta)
                a = t / np.expm1(t)
                b = t * t / (np.expm1(t) * -np.expm1(-t))
                c = t / -np.expm1(-t)
                db = b * (2.0 - 2.0 * c + t)
                ddb = db * (2.0 - 2.0 * c + t) + b * (t - 2.0 * c * (1.0 - a))
                return y * (a - b - db - ddb) - (m - y) * t
        raise AssertionError(self.link)


def _expit2(eta):
    """(μ, 1 − μ) for the logit link from one exponential, each accurate to full relative precision."""
    e = np.exp(-np.abs(eta))
    small = e / (1.0 + e)
    big = 1.0 / (1.0 + e)
    pos = eta >= 0
    return np.where(pos, big, small), np.where(pos, small, big)


def _log1mexp(t):
    """log(1 − e^−t) for t > 0, accurate for small and large t (Mächler 2012, 'Accurately computing
    log(1 − exp(−|a|))', CRAN Rmpfr vignette)."""
    return np.where(t < np.log(2.0), np.log(-np.expm1(-np.minimum(t, np.log(2.0)))),
                    np.log1p(-np.exp(-np.maximum(t, np.log(2.0)))))


def binomial_level(y, m):
    """y log(y/m) + (m − y) log(1 − y/m): a binomial row's log-density at μ = y/m without its coefficient (0
    for a 0/1 row), which :meth:`Family.loglik` leaves out and :meth:`Family.constant` holds."""
    y, m = np.asarray(y, float), np.asarray(m, float)
    if np.all(m == 1.0):
        return np.zeros(np.broadcast(y, m).shape) if np.ndim(y) or np.ndim(m) else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
        b = np.where(m > y, (m - y) * np.log(np.where(m > y, m - y, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
    return a + b


def count_level(y):
    """y log y − y (0 at y = 0): the size of a count's log-density terms (log y! ≈ this), which the count
    families keep in their constant rather than in each row's term, so that the rows' sum keeps its digits."""
    y = np.asarray(y, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)) - y, 0.0)


def _xlogy(x, logv):
    """x·log v with 0·(−∞) = 0."""
    return np.where(x == 0, 0.0, x * logv)
