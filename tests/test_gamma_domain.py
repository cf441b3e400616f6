"""A Gamma model with the inverse link (glmer's default) whose one-step start leaves the link's domain.

The start of a Gamma model with the inverse (or identity) link is one IRLS step from the intercept-only
model (:func:`fedglmm.likelihood.starts.null_step_start`).  With strong covariates and a large random-effect
variance that step puts η ≤ 0 at some rows, where the likelihood is not finite; the fit then starts again
from the intercept-only model itself (:func:`fedglmm.likelihood.starts.domain_start`), which is inside the
domain at every row.  Before, such fits stopped with "the objective is not finite at the starting values"
(glmmTMB's own start fails the same way here).  Reference: glmmTMB started from glmer's estimates
(``benchmarks/r/gamma_domain.R``; glmer's logLik, −990.58, is not maximum likelihood for Gamma)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm

DATA = Path(__file__).parent / "data" / "gamma_inverse_domain.csv"
FORMULA = "y ~ x + z + (1 | g)"
TMB = {"fixef": [0.4274800405579, -0.06982837604848, -0.03945568877196],
       "se": [0.05096520296021, 0.005387063204941, 0.05166916666899],
       "sd": 0.3052162506909, "shape": 2.558822758795, "loglik": -1003.07643335708}


@pytest.fixture(scope="module")
def frame():
    warnings.simplefilter("ignore")
    return pd.read_csv(DATA)


def _check(res):
    assert res.converged
    assert abs(res.loglik - TMB["loglik"]) < 1e-6
    assert np.allclose(res.fixef.to_numpy(), TMB["fixef"], atol=2e-6)
    assert np.allclose(res.se.to_numpy(), TMB["se"], rtol=1e-4)
    assert abs(res.random[0]["sd"] - TMB["sd"]) < 2e-6
    assert abs(res.dispersion["sigma"] - TMB["shape"] ** -0.5) < 1e-6      # glmmTMB's sigma: 1/√shape


def test_the_start_leaves_the_domain_and_the_fit_reaches_glmmtmbs_optimum(frame, monkeypatch):
    """Two mends, each enough here: the fallback starts inside the domain (coordinator), and a group whose
    modes start outside it starts where its lowest row is inside (each site's Laplace engine, random
    intercepts).  Without both the fit stopped at its first round."""
    import fedglmm.coordinator.rounds as rounds
    from fedglmm.errors import ConvergenceError
    import fedglmm.likelihood.mode_start as mode_start

    _check(fedglmm.fit(FORMULA, frame, family="gamma", method="iterative"))
    with monkeypatch.context() as m:
        m.setattr(mode_start, "_intercept_only", lambda lik: False)
        _check(fedglmm.fit(FORMULA, frame, family="gamma", method="iterative"))        # the fallback alone
        m.setattr(rounds, "domain_start", lambda *a: None)
        with pytest.raises(ConvergenceError, match="not finite at the starting values"):
            fedglmm.fit(FORMULA, frame, family="gamma", method="iterative")
    with monkeypatch.context() as m:
        m.setattr(rounds, "domain_start", lambda *a: None)
        _check(fedglmm.fit(FORMULA, frame, family="gamma", method="iterative"))        # the modes' start alone


def test_over_sites_the_default_method_reaches_the_same_fit(frame):
    sites = {f"s{k}": frame[frame.g % 3 == k].reset_index(drop=True) for k in range(3)}
    hybrid = fedglmm.fit(FORMULA, sites, family="gamma")
    pooled = fedglmm.fit(FORMULA, frame, family="gamma")
    for res in (hybrid, pooled):
        _check(res)
    it = fedglmm.fit(FORMULA, sites, family="gamma", method="iterative")
    assert np.allclose(hybrid.fixef, it.fixef, atol=1e-8) and abs(hybrid.loglik - it.loglik) < 1e-8


def test_a_fit_that_fails_in_the_inverse_links_domain_says_so(frame):
    """A Gamma fit with a bounded link that does not converge says why the log link may do better (glmer
    and glmmTMB fail on such data too: "PIRLS loop resulted in NaN value", "NaN at starting parameter
    values").  Here the rounds are cut to 3 to make it fail."""
    from fedglmm.errors import ConvergenceError
    from fedglmm.model.options import NewtonConfig

    with pytest.raises(ConvergenceError, match=r"within 3 rounds .*the inverse link needs a positive mean.*--link log"):
        fedglmm.fit(FORMULA, frame, family="gamma", method="iterative", newton=NewtonConfig(max_evals=3))
    res = fedglmm.fit(FORMULA, frame, family="gamma", link="log", method="iterative")
    assert res.converged and res.loglik > TMB["loglik"]           # the data's own link fits them better
