"""t-tests with Satterthwaite degrees of freedom (lmerTest), the lme4-shaped summary, VarCorr and ICC:
against lmerTest 3.1-3 / lme4 1.1-31 / performance-style references in tests/data/toolbox."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from toolbox import DATA, case as named, fit, frame, table

LMERTEST = {c["name"]: c for c in table("lmertest")}


def _r(name: str) -> str:
    return "(Intercept)" if name == "Intercept" else name.replace("[T.", "").replace("]", "")


@pytest.mark.parametrize("name", sorted(LMERTEST))
def test_satterthwaite_matches_lmertest(name):
    """df and Pr(>|t|) within 1 % of lmerTest's, split over 3 sites by the first grouping factor (pooled
    where the design's levels cannot be split so: crossed factors)."""
    import re

    from fedglmm.errors import FedGLMMError

    case = LMERTEST[name]
    d = frame(case)
    group = re.findall(r"\|\|?\s*([A-Za-z_.][\w.]*)\s*\)", case["formula"])[0]
    sites = {f"s{k}": d[d[group].astype("category").cat.codes % 3 == k] for k in range(3)}
    try:
        res = fit(case["formula"], sites, reml=case["reml"] == "1")
    except FedGLMMError:
        res = fit(case["formula"], d, reml=case["reml"] == "1")
    ref = case["ref"]["coefficients"]
    tab = res.tests()
    assert list(tab.columns) == case["ref"]["coef_columns"]
    for nm, row in tab.iterrows():
        r = ref[_r(nm)]
        assert row["df"] == pytest.approx(r["df"], rel=0.01), nm
        assert row["Pr(>|t|)"] == pytest.approx(r["Pr(>|t|)"], rel=0.01), nm
        assert row["t value"] == pytest.approx(r["t value"], rel=1e-4), nm


def test_ddf_none_gives_z_tests():
    case = named(LMERTEST, "sleepstudy_reml")
    res = fit(case["formula"], frame(case), ddf="none")
    assert res.df is None and list(res.tests().columns)[2:] == ["z value", "Pr(>|z|)"]
    assert np.allclose(res.pvalues, 2 * stats.norm.sf(np.abs(res.fixef / res.se)))
    out = json.loads(res.to_json())
    assert "df" not in out and "z" in out and "npar" in out


def test_summary_and_json_as_lmertest():
    case = named(LMERTEST, "sleepstudy_reml")
    res = fit(case["formula"], frame(case))
    text = res.summary(correlation=True)
    lines = text.splitlines()
    head = next(ln for ln in lines if "Estimate" in ln)
    assert head.split() == ["Estimate", "Std.", "Error", "df", "t", "value", "Pr(>|t|)"]
    assert "REML criterion at convergence: 1743.6" in text
    # decimals aligned per column: every number of a column ends at the same place, same decimals
    rows = lines[lines.index(head) + 1: lines.index(head) + 3]
    assert len(rows) == 2 and len({len(r.split("***")[0].rstrip()) for r in rows}) == 1
    assert [r.split()[1].split(".")[1].__len__() for r in rows] == [3, 3]
    assert "Variance" in text and "Std.Dev." in text and "Correlation of Fixed Effects:" in text
    assert "Correlation of Fixed Effects:" not in res.summary()
    out = json.loads(res.to_json())
    assert out["df"]["Days"] == pytest.approx(case["ref"]["coefficients"]["Days"]["df"], rel=0.01)
    assert "t" in out and "z" not in out and out["npar"] == 6


VARCORR = {c["name"]: c for c in table("varcorr")}


@pytest.mark.parametrize("name", sorted(VARCORR))
def test_varcorr_and_icc(name):
    """as.data.frame(VarCorr(m)) to 1e-3 relative, and the adjusted / conditional ICC to 1e-3."""
    case = VARCORR[name]
    res = fit(case["formula"], frame(case), family=case["family"], link=case["link"] or None,
              nagq=max(int(case["nagq"]), 1), reml=case["reml"] == "1")
    vc = res.varcorr()
    ref = case["ref"]["varcorr"]
    if res.loglik > case["ref"]["fit"]["logLik"] + 1e-3:
        # lme4 stopped short of the optimum here (grouseticks: HEIGHT unscaled): glmmTMB's fit is the reference
        tmb = json.loads((DATA / "lme4" / f"{name}.tmb.json").read_text())
        assert res.loglik == pytest.approx(tmb["logLik"], abs=1e-4)
        sds = [s for v in tmb["sd"].values() for s in np.atleast_1d(v)]
        ref = [dict(r, vcov=s * s, sdcor=s) for r, s in zip(ref, sds)]
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"] and len(vc) == len(ref)
    for (_, mine), theirs in zip(vc.iterrows(), ref):
        assert mine["vcov"] == pytest.approx(theirs["vcov"], rel=2e-3, abs=1e-6)
        assert mine["sdcor"] == pytest.approx(theirs["sdcor"], rel=2e-3, abs=1e-4)
        assert (mine["var2"] is None) == (theirs["var2"] is None)
    icc = case["ref"].get("icc")
    if icc:
        got = res.icc()
        assert got["adjusted"] == pytest.approx(icc["icc_adjusted"], rel=2e-3)
        assert got["conditional"] == pytest.approx(icc["icc_conditional"], rel=2e-3)
        if len(icc["icc_by_group"]) > 1:
            for g, v in icc["icc_by_group"].items():
                assert got[f"group:{g}"] == pytest.approx(v, rel=2e-3, abs=1e-5), g
