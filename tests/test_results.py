"""The result object: predictions, conditional modes and SDs, intervals, JSON — against lme4 where it can."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

import fedglmm

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def sleep():
    d = pd.read_csv(DATA / "sleepstudy.csv")
    return d, fedglmm.fit("Reaction ~ Days + (Days | Subject)", d, site=None)


@pytest.fixture(scope="module")
def contra():
    d = pd.read_csv(DATA / "contraception.csv")
    return d, fedglmm.fit("use ~ urban + age + livch + (urban | district)", d, family="binomial")


def test_conditional_prediction_matches_lme4s_fitted_values(sleep):
    """lme4's fitted values from its own fixef and ranef (REML): ours agree to 0.01 ms."""
    d, res = sleep
    ref = json.loads((DATA / "lme4" / "sleepstudy_reml.json").read_text())
    re = pd.DataFrame(ref["ranef"]["Subject"]).set_index("level")
    re.index = re.index.astype(str)
    b = re.loc[d.Subject.astype(str)]
    lme4 = ref["fixef"]["(Intercept)"] + b["(Intercept)"].to_numpy() \
        + (ref["fixef"]["Days"] + b["Days"].to_numpy()) * d.Days.to_numpy()
    assert np.max(np.abs(res.predict(d) - lme4)) < 0.01
    pop = res.predict(d, conditional=False)
    assert np.allclose(pop, res.fixef["Intercept"] + res.fixef["Days"] * d.Days)


def test_prediction_response_scale_and_new_levels(contra):
    d, res = contra
    eta = res.predict(d)
    assert np.allclose(res.predict(d, type="response"), special.expit(eta))
    # a district the fit has not seen gets the population prediction (lme4's allow.new.levels)
    new = d.head(5).assign(district=9999)
    assert np.allclose(res.predict(new), res.predict(new, conditional=False))
    # the group column is not needed for population predictions
    assert np.allclose(res.predict(d.drop(columns="district").head(5), conditional=False),
                       res.predict(d.head(5), conditional=False))


def test_prediction_is_fixed_plus_random_part(contra):
    d, res = contra
    modes = res.ranef()
    b = modes.loc[d.district.astype(str)].to_numpy()
    urban = (d.urban == "Y").to_numpy(float)
    by_hand = res.predict(d, conditional=False) + b[:, 0] + b[:, 1] * urban
    assert np.allclose(res.predict(d), by_hand)


def test_conditional_sds(contra):
    _, res = contra
    modes, sds = res.ranef(condvar=True)
    assert list(modes.index) == list(sds.index) and modes.shape == sds.shape == (60, 2)
    prior = [r["sd"] for r in res.random if "sd" in r]
    assert (sds.to_numpy() > 0).all() and (sds.to_numpy() < np.array(prior)).all()


def test_conditional_sds_for_an_lmm_equal_the_closed_form(sleep):
    """For a gaussian model Cov(b_i | y) = (Σ_b⁻¹ + ZᵢᵀZᵢ/σ²)⁻¹, computed here directly.

    The sites compute the conditional SDs in the final round, at the last evaluated point with σ̂
    extrapolated to first order; the reported estimates add that point's last Newton step (about 1e-7 SE),
    hence agreement to 1e-4 rather than to rounding."""
    d, res = sleep
    sigma2 = res.residual_sd ** 2
    S = res.cov_re.to_numpy()
    _, sds = res.ranef(condvar=True)
    g = d[d.Subject == 308]
    Z = np.c_[np.ones(len(g)), g.Days]
    cov = np.linalg.inv(np.linalg.inv(S) + Z.T @ Z / sigma2)
    assert np.allclose(sds.loc["308"].to_numpy(), np.sqrt(np.diag(cov)), rtol=1e-4)


def test_intervals_and_tests(contra):
    _, res = contra
    ci = res.conf_int(0.9)
    z = stats.norm.ppf(0.95)
    assert np.allclose(ci.iloc[:, 0], res.fixef - z * res.se) and np.allclose(ci.iloc[:, 1], res.fixef + z * res.se)
    assert np.allclose(res.pvalues, 2 * stats.norm.sf(np.abs(res.fixef / res.se)))


def test_json_is_strict_and_complete(contra, tmp_path):
    _, res = contra
    text = res.to_json(tmp_path / "fit.json")
    out = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    for key in ("fixef", "se", "random", "residual_sd", "loglik", "aic", "bic", "nobs", "ngroups", "nsites",
                "rounds", "bytes_to_sites", "bytes_from_sites", "converged", "seconds", "method", "nagq"):
        assert key in out, key
    assert out["ngroups"] == {"district": 60}
    assert {"group": "district", "term": "urban[T.Y]", "sd": pytest.approx(0.801, abs=1e-3)} in out["random"]
    corr = [r for r in out["random"] if "corr" in r][0]
    assert corr["term1"] == "Intercept" and corr["term2"] == "urban[T.Y]" and corr["corr"] == pytest.approx(-0.798, abs=2e-3)


def test_summary_reads_like_lme4(contra):
    _, res = contra
    text = res.summary()
    for piece in ("Laplace Approximation", "Random effects:", "district", "Fixed effects:", "urban[T.Y]",
                  "Std. Error", "Pr(>|z|)", "Number of obs: 1934", "Rounds:"):
        assert piece in text, piece
