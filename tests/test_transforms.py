"""Stateful transforms with pooled state: center(), scale(), standardize(), poly(), mean(), sd() give the
pooled fit over any split (1e-8) and lme4's fit (held-out `data` cases, R's scale() and poly()); poly's
coefficients are R's; transforms whose state cannot be pooled are refused, saying how to write them."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.errors import FedGLMMError, InputError
from fedglmm.model.transforms import _pool_one, _sums, orthogonal_recurrence, poly_columns
from heldout_data import HELDOUT, assert_same_fit, cases, check_parity, split
from test_cli import assert_clean_error, invoke

CASES = cases()
TRANSFORM_CASES = ["sleepstudy_poly_reml", "sleepstudy_poly_ml", "contraception_scale", "contraception_poly",
                   "contraception_poly_gh10", "grouseticks_center", "grouseticks_scale", "sim_transform_poly",
                   "sim_transform_center"]


def _fit(case, data, **kw):
    return fedglmm.fit(case["formula"], data, family=case["family"], nagq=case["nagq"], reml=case["reml"], **kw)


@pytest.fixture(scope="module")
def frames():
    return {name: pd.read_csv(CASES[name]["data"]) for name in TRANSFORM_CASES}


# --- poly: R's coefficients from pooled power sums ----------------------------------------------------

@pytest.mark.parametrize("name,column,degree", [("sleepstudy_poly_ml", "Days", 2), ("contraception_poly", "age", 2),
                                                ("sim_transform_poly", "age", 3)])
@pytest.mark.parametrize("nsites", [1, 3, 7])
def test_poly_coefficients_are_rs(frames, name, column, degree, nsites):
    """alpha and norm2 from the sites' sums of powers (up to 2k) equal R's attr(poly(x, k), "coefs")."""
    x = frames[name][column].to_numpy(float)
    parts = [{"kind": "poly", "degree": degree, "raw": False, **_sums(x[i::nsites], 2 * degree)}
             for i in range(nsites)]
    state = _pool_one(f"poly({column}, {degree})", parts)
    want = CASES[name]["refs"][0]["poly_coefs"][f"poly({column}, {degree})"]
    assert np.allclose(state["alpha"], want["alpha"], rtol=1e-12, atol=1e-12)
    assert np.allclose(state["norm2"], want["norm2"], rtol=1e-12)
    # the columns: orthonormal, orthogonal to the constant, positive leading coefficient (R's sign)
    Z = poly_columns(x, state["alpha"], state["norm2"], degree)
    assert np.allclose(Z.T @ Z, np.eye(degree), atol=1e-10) and np.allclose(Z.sum(axis=0), 0, atol=1e-9)
    lead = np.linalg.lstsq(np.vander(x, degree + 1, increasing=True), Z, rcond=None)[0][-1]
    assert lead[-1] > 0


def test_recurrence_from_moments_equals_the_recurrence_on_rows():
    """Stieltjes in moment space against the three-term recurrence run on the rows themselves."""
    rng = np.random.default_rng(11)
    t = rng.normal(size=500)
    k = 4
    alpha, norms = orthogonal_recurrence([np.sum(t ** m) for m in range(2 * k + 1)], k)
    P_prev, P = np.zeros_like(t), np.ones_like(t)
    for j in range(k):
        a = np.sum(t * P * P) / np.sum(P * P)
        assert np.isclose(alpha[j], a, rtol=1e-9) and np.isclose(norms[j], np.sum(P * P), rtol=1e-9)
        beta = np.sum(P * P) / np.sum(P_prev * P_prev) if j else 0.0
        P_prev, P = P, (t - a) * P - beta * P_prev
    assert np.isclose(norms[k], np.sum(P * P), rtol=1e-8)


# --- fits: any split is the pooled fit, and the pooled fit is lme4's -------------------------------------

@pytest.mark.parametrize("name", TRANSFORM_CASES)
def test_transform_fits_equal_lme4(frames, name):
    case = CASES[name]
    res = _fit(case, split(frames[name], case["split"], 3), method="iterative")
    check_parity(res, case)
    assert res.nobs == case["refs"][0]["n"]


@pytest.mark.parametrize("name", ["sleepstudy_poly_reml", "contraception_scale", "grouseticks_center",
                                  "sim_transform_poly"])
def test_transform_fits_over_3_and_7_sites_equal_the_pooled_fit(frames, name):
    case, df = CASES[name], frames[name]
    pooled = _fit(case, df, method="iterative")
    for k in (3, 7):
        assert_same_fit(_fit(case, split(df, case["split"], k), method="iterative"), pooled)
    if name.startswith(("sleepstudy", "sim")):
        assert_same_fit(_fit(case, split(df, case["split"], 7)), pooled, se_rtol=1e-4)      # the hybrid


@pytest.mark.parametrize("term", ["center(x)", "standardize(x)", "scale(x) + I(scale(x)**2)", "poly(x, 3)"])
def test_simulated_transform_fits_over_3_and_7_sites(term):
    rng = np.random.default_rng(8)
    g = np.repeat(np.arange(42), 12)
    x = rng.normal(size=len(g)) * (1 + g % 3) + 3.0 * (g % 7)          # sites differ in mean and spread
    y = (rng.random(len(g)) < 1 / (1 + np.exp(-(-0.5 + 0.3 * (x - 9) / 5 + rng.normal(size=42)[g])))) * 1
    df = pd.DataFrame({"y": y, "x": x, "g": g})
    pooled = fedglmm.fit(f"y ~ {term} + (1 | g)", df, family="binomial", method="iterative")
    for k in (3, 7):
        sites = {f"s{i}": df[g % k == i] for i in range(k)}
        assert_same_fit(fedglmm.fit(f"y ~ {term} + (1 | g)", sites, family="binomial", method="iterative"), pooled)


def test_the_issue_case_center_is_the_pooled_mean():
    """y ~ center(x): each site used to centre on its own mean (a different model, silently)."""
    rng = np.random.default_rng(2)
    g = np.repeat(np.arange(30), 20)
    x = rng.normal(size=600) + 2.0 * (g % 3)               # sites differ in their mean of x
    y = 0.5 + 0.9 * x + rng.normal(size=30)[g] + rng.normal(size=600)
    df = pd.DataFrame({"y": y, "x": x, "school": g})
    sites = {f"s{k}": df[g % 3 == k] for k in range(3)}
    fed = fedglmm.fit("y ~ center(x) + (1 | school)", sites)
    by_hand = fedglmm.fit("y ~ xc + (1 | school)", df.assign(xc=x - x.mean()))
    assert np.allclose(fed.fixef.values, by_hand.fixef.values, atol=1e-8)
    assert abs(fed.loglik - by_hand.loglik) < 1e-8


@pytest.mark.parametrize("written,by_hand", [
    ("standardize(x)", lambda x: (x - x.mean()) / x.std()),                 # patsy's: ddof = 0
    ("standardize(x, ddof=1)", lambda x: (x - x.mean()) / x.std(ddof=1)),
    ("scale(x, center = FALSE)", lambda x: x / np.sqrt(np.sum(x ** 2) / (len(x) - 1))),   # R's root mean square
    ("scale(x, scale=FALSE)", lambda x: x - x.mean()),
    ("I(x / sd(x))", lambda x: x / x.std(ddof=1)),
    ("poly(x, 2, raw=True)", lambda x: np.column_stack([x, x ** 2])),
])
def test_transform_values_are_the_pooled_datas(written, by_hand):
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(24), 15)
    x = rng.gamma(2.0, size=len(g)) + (g % 4)
    y = rng.poisson(np.exp(0.2 + 0.3 * x / x.std()))
    df = pd.DataFrame({"y": y, "x": x, "g": g})
    sites = {f"s{k}": df[g % 4 == k] for k in range(4)}
    fed = fedglmm.fit(f"y ~ {written} + (1 | g)", sites, family="poisson", method="iterative")
    cols = np.atleast_2d(by_hand(x).T).T
    pre = df.assign(**{f"h{j}": cols[:, j] for j in range(cols.shape[1])})
    ref = fedglmm.fit("y ~ " + " + ".join(f"h{j}" for j in range(cols.shape[1])) + " + (1 | g)", pre,
                      family="poisson", method="iterative")
    assert np.allclose(fed.fixef.values, ref.fixef.values, atol=1e-8)


def test_prediction_applies_the_pooled_state(frames):
    case = CASES["sim_transform_poly"]
    df = frames["sim_transform_poly"]
    res = _fit(case, split(df, "g", 3))
    new = df.iloc[[5, 100, 700]]
    pred = res.predict(new, conditional=False)
    assert isinstance(pred, pd.Series) and list(pred.index) == list(new.index)
    st = res.schema.transforms
    P = poly_columns(new.age, st["poly(age, 3)"]["alpha"], st["poly(age, 3)"]["norm2"], 3)
    sd = np.sqrt(st["scale(dose)"]["m2"] / (st["scale(dose)"]["n"] - 1))
    X = np.column_stack([np.ones(3), P, (new.dose - st["scale(dose)"]["mean"]) / sd])
    assert np.allclose(pred.to_numpy(), X @ res.fixef.to_numpy(), atol=1e-10)
    # the same from the fit's JSON (what a site uses)
    from fedglmm.prediction import Predictor

    again = Predictor.from_dict(json.loads(res.to_json())).predict(new, conditional=False)
    assert np.allclose(again, pred, atol=1e-12)


def test_stateful_formulas_take_one_more_round_in_the_hybrid(frames):
    df = frames["sleepstudy_poly_ml"]
    a = fedglmm.fit("Reaction ~ center(Days) + (Days | Subject)", split(df, "Subject", 3), reml=False)
    b = fedglmm.fit("Reaction ~ Dc + (Days | Subject)", split(df.assign(Dc=df.Days - 4.5), "Subject", 3), reml=False)
    assert a.rounds == b.rounds + 1
    i = fedglmm.fit("Reaction ~ center(Days) + (Days | Subject)", df, reml=False, method="iterative")
    j = fedglmm.fit("Reaction ~ Dc + (Days | Subject)", df.assign(Dc=df.Days - 4.5), reml=False, method="iterative")
    assert i.rounds == j.rounds                     # the describe round carries the sums
    o = fedglmm.fit("Reaction ~ center(Days) + (Days | Subject)", df, reml=False, method="oneshot")
    assert o.rounds == 2 and np.allclose(o.fixef.values, i.fixef.values, atol=1e-6)


# --- refused ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("term,fragment", [
    ("bs(age, df=4)", "give them: bs(x, knots="),
    ("cr(age, df=4)", "cannot be pooled exactly"),
    ("ns(age, 3)", "write a spline with explicit knots"),
    ("I(age - np.mean(age))", "write mean(x) or sd(x)"),
    ("I(age / age.std())", "each site's own rows"),
    ("I(age / max(age))", "each site's own rows"),
    ("lag(age)", "order of each site's rows"),
    ("scale(poly(age, 2))", "write one of them"),
])
def test_unpoolable_transforms_are_refused(term, fragment):
    from test_cli import BUNDLED

    r = invoke("fit", "-f", f"use ~ {term} + (1 | district)", "--family", "binomial", str(BUNDLED))
    msg = assert_clean_error(r, 2, fragment)
    assert "formula" in msg


def test_explicit_knots_are_fine():
    df = pd.read_csv(HELDOUT / "contraception.csv")
    res = fedglmm.fit("use ~ bs(age, knots=[-5, 5], lower_bound=-14, upper_bound=20) + (1 | district)",
                      split(df, "district", 3), family="binomial", method="iterative")
    ref = fedglmm.fit("use ~ bs(age, knots=[-5, 5], lower_bound=-14, upper_bound=20) + (1 | district)", df,
                      family="binomial", method="iterative")
    assert_same_fit(res, ref)


def test_degenerate_transform_arguments():
    df = pd.read_csv(HELDOUT / "contraception.csv").assign(one=1.0, two=lambda d: (d.age > 0) * 1.0)
    with pytest.raises(InputError, match=r"scale\(one\): its argument is constant"):
        fedglmm.fit("use ~ scale(one) + (1 | district)", df, family="binomial")
    with pytest.raises(InputError, match="fewer than 3 distinct values"):
        fedglmm.fit("use ~ poly(two, 2) + (1 | district)", df, family="binomial")


def test_a_summary_file_cannot_pool(tmp_path):
    df = pd.read_csv(HELDOUT / "sleepstudy.csv")
    path = tmp_path / "A.csv"
    df.to_csv(path, index=False)
    r = invoke("summarize", "-f", "Reaction ~ scale(Days) + (1 | Subject)", "-o", tmp_path / "A.json", path)
    assert_clean_error(r, 1, "must be pooled over all sites first")


def test_site_predict_writes_the_sites_fitted_values(tmp_path, frames):
    case = CASES["sim_transform_poly"]
    df = frames["sim_transform_poly"]
    sites = split(df, "g", 3)
    res = _fit(case, sites)
    res.to_json(tmp_path / "fit.json")
    part = sites["s1"].copy()
    part.loc[part.index[2], "dose"] = np.nan
    part.to_csv(tmp_path / "s1.csv", index=False)
    r = invoke("site", "predict", "--fit", tmp_path / "fit.json", "--data", tmp_path / "s1.csv",
               "-o", tmp_path / "fitted.csv")
    assert r.exit_code == 0, r.stderr
    out = pd.read_csv(tmp_path / "fitted.csv")
    assert list(out.columns) == ["line", "fitted"] and out.line.tolist() == list(range(2, len(part) + 2))
    want = res.predict(sites["s1"], type="response")
    assert np.isnan(out.fitted[2]) and np.allclose(np.delete(out.fitted.to_numpy(), 2),
                                                   np.delete(want.to_numpy(), 2), rtol=1e-12)
    with pytest.raises(FedGLMMError, match="fitted values stay at the sites"):
        res.predict()
    assert_clean_error(invoke("site", "predict", "--fit", tmp_path / "s1.csv", "--data", tmp_path / "s1.csv",
                              "-o", tmp_path / "x.csv"), 1, "not JSON")
