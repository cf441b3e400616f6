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
    """Three sites of five hospitals each: the first Newton round tries the fits' log-scale combination to
    third order beside the levels-averaged start; the fit is the iterative method's, in no more rounds, and the combination is near it."""
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
    (start,), = seen                  # (the fits' third derivatives came too: their combination to third order)
    np.testing.assert_allclose(hyb.fixef, it.fixef, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(hyb.theta, it.theta, rtol=1e-7, atol=1e-8)
    assert hyb.loglik == pytest.approx(it.loglik, rel=1e-10)
    assert hyb.rounds <= it.rounds
    # its SDs (internal scale: Z's columns are intercepts, unscaled) within a quarter of the estimate's
    np.testing.assert_allclose(start[1], it.theta, rtol=0.25)


def _cubic_engine(A: np.ndarray, T: np.ndarray):
    """An engine whose ℓ(x) = −(½ xᵀAx + T[x, x, x]/6): its Hessian −(A + T[x]) is linear in x."""
    return NS(sums=lambda x: {"hess": -(A + np.einsum("abc,c->ab", T, x))})


def test_covariance_third_is_exact_for_a_cubic_on_the_covariance_entries():
    """Forward differences of a Hessian linear in x are exact: every third derivative with an index among the
    covariance parameters (x[p:]) is T's, those among the fixed effects alone are 0."""
    from fedglmm.site.own_fit import covariance_third

    rng = np.random.default_rng(3)
    P, p = 5, 3
    T = rng.normal(size=(P, P, P))
    T = sum(T.transpose(pm) for pm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))) / 6.0
    A = np.diag([40.0, 30.0, 20.0, 10.0, 5.0])
    x = rng.normal(size=P) * 0.1
    got = covariance_third(_cubic_engine(A, T), x, A + np.einsum("abc,c->ab", T, x), np.arange(p, P))
    fixed = np.arange(P) < p
    only_fixed = fixed[:, None, None] & fixed[None, :, None] & fixed[None, None, :]
    np.testing.assert_allclose(got[~only_fixed], T[~only_fixed], rtol=1e-9, atol=1e-9)
    assert np.all(got[only_fixed] == 0.0)


def test_fits_with_third_derivatives_are_combined_to_third_order():
    """Where every fit sent third derivatives, their combination is to third order: a likelihood that falls off
    faster below an SD's estimate than above (−ℓ's third derivative in it negative) moves the combined SD up,
    the fixed effects stay the information-weighted mean (diagonal information, nothing coupling them to the
    SDs); with one fit without them, the log-scale combination of the quadratics."""
    st = _setup()
    fits = [_fit([0.5, 1.0], [0.8, 0.3], [40.0, 90.0, 30.0, 12.0]),
            _fit([0.1, 1.4], [1.2, 0.5], [10.0, 30.0, 20.0, 8.0])]
    (g0, t0), = factor_log_start(st, [dict(f, third=np.zeros((4, 4, 4))) for f in fits])
    skew = np.zeros((4, 4, 4))
    skew[2, 2, 2] = -60.0
    (g1, t1), = factor_log_start(st, [dict(f, third=skew) for f in fits])
    assert t1[0] > t0[0] + 0.01 and t1[1] == pytest.approx(t0[1], rel=1e-6)
    K = np.array([f["info"].diagonal()[:2] for f in fits])
    b = np.array([f["beta"] for f in fits])
    np.testing.assert_allclose(g1, (K * b).sum(0) / K.sum(0), rtol=1e-8)
    (g2, t2), = factor_log_start(st, [dict(fits[0], third=skew), fits[1]])
    (g3, t3), = factor_log_start(st, fits)
    np.testing.assert_array_equal(np.r_[g2, t2], np.r_[g3, t3])


def test_a_full_own_fit_sends_third_derivatives_a_fit_without_a_factor_does_not():
    """A site with several levels of every factor sends its fit's third derivatives along the covariance
    parameters (β, then the two SDs: 4 × 4 × 4); one that left out the factor it holds one level of sends none."""
    from fedglmm.site.summaries import summarize

    formula = "y ~ trt + time + (1 | patient) + (1 | hospital)"
    frame = _three_sites(0)["s0"]
    loc = summarize(frame, formula, "binomial", None, "s0", order=2, local={"nagq": 1})["local"]
    assert "alone" not in loc and np.shape(loc["third"]) == (5, 5, 5) and np.all(np.isfinite(loc["third"]))
    one = frame[frame["hospital"] == frame["hospital"].iloc[0]].reset_index(drop=True)
    loc1 = summarize(one, formula, "binomial", None, "s0", order=2, local={"nagq": 1})["local"]
    assert loc1["alone"] == ["hospital"] and "third" not in loc1
