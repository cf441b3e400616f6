"""The sites' own fits of the full model (several grouping factors) combined by their information, the
standard deviations on the log scale (fedglmm.coordinator.own_combination)."""
from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.coordinator.own_combination import factor_log_start
from fedglmm.likelihood.setup import Setup


def _setup():
    st = NS(names=["Intercept", "x"], ndisp=0, A=np.eye(2), mask=np.eye(2, dtype=bool), theta_scale=np.ones(2),
            znames=["Intercept", "Intercept"])
    st.internal_transform = lambda: Setup.internal_transform(st)
    return st


def _fit(beta, theta, info, **kw):
    return {"names": ["Intercept", "x"], "z_names": ["Intercept", "Intercept"], "beta": beta, "theta": theta,
            "info": np.diag(info), "n": 100.0, **kw}


def test_log_combination_has_its_closed_form():
    """With diagonal information the combination is coordinate-wise: the fixed effects' information-weighted
    mean, and each SD exp(Σ w log s / Σ w) with w = K s² (the information of log s at the site's fit)."""
    fits = [_fit([0.5, 1.0], [0.8, 0.3], [40.0, 90.0, 30.0, 12.0]),
            _fit([0.1, 1.4], [1.2, 0.5], [10.0, 30.0, 20.0, 8.0]),
            _fit([0.3, 0.9], [1.0, 0.4], [25.0, 60.0, 25.0, 10.0])]
    (gamma, theta), = factor_log_start(_setup(), fits)
    K = np.array([f["info"].diagonal() for f in fits])
    b = np.array([f["beta"] for f in fits])
    s = np.array([f["theta"] for f in fits])
    np.testing.assert_allclose(gamma, (K[:, :2] * b).sum(0) / K[:, :2].sum(0), rtol=1e-12)
    w = K[:, 2:] * s ** 2
    np.testing.assert_allclose(theta, np.exp((w * np.log(s)).sum(0) / w.sum(0)), rtol=1e-12)


def test_only_full_fits_coded_as_agreed_are_combined():
    """A fit that left out a factor, one coded otherwise, or one without information is not used; with fewer
    than two fits left there is nothing to combine."""
    st = _setup()
    good = _fit([0.5, 1.0], [0.8, 0.3], [40.0, 90.0, 30.0, 12.0])
    others = [dict(good, alone=["hospital"]), dict(good, names=["Intercept"]), dict(good, info=None),
              dict(good, z_names=["Intercept", "time"])]
    assert factor_log_start(st, [good] + others) == []
    assert len(factor_log_start(st, [good, good] + others)) == 1


def _three_sites(seed: int):
    """test_starts' 15 simulated hospitals (binary visits of 25-40 patients each) dealt to 3 sites: each site
    holds five levels of the hospital factor and all of its patients."""
    from test_starts import _hospitals

    hospitals = _hospitals(seed, H=15)
    return {f"s{k}": pd.concat([hospitals[f"h{h}"] for h in range(k, 15, 3)], ignore_index=True) for k in range(3)}


@pytest.mark.parametrize("seed", [1, 2])
def test_sites_with_several_hospitals_try_the_log_combination(monkeypatch, seed):
    """Three sites of five hospitals each: the first Newton round tries the fits' log-scale combination beside
    the levels-averaged start; the fit is the iterative method's, in no more rounds, and the combination is near it."""
    import fedglmm.methods.hybrid as hybrid

    seen = []

    def spy(st, own):
        out = factor_log_start(st, own)
        seen.append(out)
        return out

    monkeypatch.setattr(hybrid, "factor_log_start", spy)
    sites = _three_sites(seed)
    formula = "y ~ trt + time + (1 | patient) + (1 | hospital)"
    hyb = fedglmm.fit(formula, sites, family="binomial")
    it = fedglmm.fit(formula, sites, family="binomial", method="iterative")
    (start,), = seen
    np.testing.assert_allclose(hyb.fixef, it.fixef, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(hyb.theta, it.theta, rtol=1e-7, atol=1e-8)
    assert hyb.loglik == pytest.approx(it.loglik, rel=1e-10)
    assert hyb.rounds <= it.rounds
    # its SDs (internal scale: Z's columns are intercepts, unscaled) within a quarter of the estimate's
    np.testing.assert_allclose(start[1], it.theta, rtol=0.25)
