"""Missing values: each site omits its incomplete rows (na_action="omit", lme4's na.omit), counts them, and
the fit equals lme4's on the held-out `_na` cases; na_action="fail" refuses; nothing left is refused."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.errors import FedGLMMError, InputError
from fedglmm.model.formula import parse_formula, variables
from heldout_data import assert_same_fit, cases, check_parity, split

CASES = cases()
NA_CASES = ["contraception_na", "grouseticks_na", "sleepstudy_na_reml", "sleepstudy_na_ml"]
# rows dropped, from tests/data/heldout/data/README.md
DROPPED = {"contraception_na": 95, "grouseticks_na": 16, "sleepstudy_na_reml": 4, "sleepstudy_na_ml": 4}


def _fit(case, data, **kw):
    return fedglmm.fit(case["formula"], data, family=case["family"], nagq=case["nagq"], reml=case["reml"], **kw)


@pytest.mark.parametrize("name", NA_CASES)
def test_na_omit_equals_lme4_and_the_pooled_fit(name):
    case = CASES[name]
    df = pd.read_csv(case["data"])
    sites = split(df, case["split"], 3)
    res = _fit(case, sites)
    check_parity(res, case)
    assert res.nobs == case["refs"][0]["n"] == len(df) - DROPPED[name]
    # per site: the rows of that site with a missing value in a column the model uses
    used = variables(parse_formula(case["formula"]))
    want = {sid: int(part[used].isna().any(axis=1).sum()) for sid, part in sites.items()}
    assert res.omitted == want and sum(want.values()) == DROPPED[name]
    assert res.to_dict()["omitted"] == want
    assert f"({DROPPED[name]} observations deleted due to missingness: " in res.summary()
    pooled = _fit(case, df)
    assert pooled.omitted == {"site1": DROPPED[name]}
    assert_same_fit(res, pooled, se_rtol=1e-4)
    assert_same_fit(_fit(case, sites, method="iterative"), _fit(case, df, method="iterative"))


def test_complete_data_reports_nothing_omitted():
    case = CASES["sleepstudy_na_ml"]
    df = pd.read_csv(case["data"]).dropna()
    res = _fit(case, split(df, "Subject", 3))
    assert res.omitted == {"s0": 0, "s1": 0, "s2": 0}
    assert "missingness" not in res.summary()


def test_na_fail_refuses_with_the_site_column_and_row():
    case = CASES["sleepstudy_na_ml"]
    df = pd.read_csv(case["data"])
    with pytest.raises(FedGLMMError) as e:
        _fit(case, split(df, "Subject", 3), na_action="fail")
    msg = str(e.value)
    assert "\n" not in msg and "missing value" in msg and "site 's" in msg and "na_action='omit'" in msg
    with pytest.raises(InputError, match="na_action must be 'omit'"):
        _fit(case, df, na_action="drop")


def test_rules_apply_to_the_rows_that_remain():
    from fedglmm.site import SiteConfig

    case = CASES["sleepstudy_na_ml"]
    df = pd.read_csv(case["data"])
    sites = {"A": df.iloc[:150], "B": df.iloc[150:].copy()}
    sites["B"].loc[sites["B"].index[:25], "Days"] = np.nan        # 30 rows, 5 left
    with pytest.raises(FedGLMMError, match="site 'B' refuses: 5 rows, fewer than the minimum of 10"):
        _fit(case, sites, site_config=SiteConfig(min_rows=10, min_cell=0))


def test_no_rows_left():
    df = pd.read_csv(CASES["sleepstudy_na_ml"]["data"])
    df = df.dropna()
    sites = {"A": df.iloc[:90], "B": df.iloc[90:].assign(Days=np.nan)}
    with pytest.raises(FedGLMMError) as e:
        fedglmm.fit("Reaction ~ Days + (1 | Subject)", sites)
    assert str(e.value) == f"site 'B': no rows left after omitting the {len(df) - 90} rows with a missing value (in Days)"
