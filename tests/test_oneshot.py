"""One-shot summaries, the fit from summary files, and the hybrid method."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.errors import FedGLMMError
from fedglmm.methods.oneshot import summarize, to_jsonable

DATA = Path(__file__).parent / "data"

LMMS = [
    ("sleepstudy.csv", "Reaction ~ Days + (Days | Subject)", "Subject"),
    ("sleepstudy.csv", "Reaction ~ Days + (Days || Subject)", "Subject"),
    ("extra_sim_gauss_factor.csv", "y ~ x * f + (1 | g)", "g"),
    ("contraception.csv", "age ~ urban + livch + (urban | district)", "district"),
]


def _sites(df, group, k=3):
    codes = pd.factorize(df[group])[0]
    return {f"s{i}": df[codes % k == i].reset_index(drop=True) for i in range(k)}


def _same(a, b, tol):
    assert np.allclose(a.fixef, b.fixef, rtol=0, atol=tol)
    assert np.allclose(a.se, b.se, rtol=0, atol=tol)
    assert abs(a.loglik - b.loglik) < tol
    assert np.allclose([r.get("sd", r.get("corr")) for r in a.random],
                       [r.get("sd", r.get("corr")) for r in b.random], rtol=0, atol=tol)
    assert abs(a.residual_sd - b.residual_sd) < tol
    assert np.allclose(a.ranef().to_numpy(), b.ranef().reindex(a.ranef().index).to_numpy(), atol=1e-6)


@pytest.mark.parametrize("fname,formula,group", LMMS, ids=[f[1] for f in LMMS])
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_gaussian_oneshot_is_the_exact_fit_in_one_round(fname, formula, group, reml):
    df = pd.read_csv(DATA / fname)
    exact = fedglmm.fit(formula, df, method="iterative", reml=reml)
    small = df.groupby(group).size().min() < 10          # contraception has a district of 4 women
    for method in ("oneshot", "hybrid"):
        res = fedglmm.fit(formula, _sites(df, group), method=method, reml=reml, min_group=1 if small else 10)
        assert res.rounds == 1 and res.converged
        _same(res, exact, 1e-6)
    if small:
        with pytest.raises(FedGLMMError, match="fewer than 10 rows"):
            fedglmm.fit(formula, _sites(df, group), method="oneshot", reml=reml)


def test_sites_missing_factor_levels_map_to_the_agreed_columns():
    """A site without some levels of a factor still contributes to exactly the right columns."""
    df = pd.read_csv(DATA / "contraception.csv")
    formula = "age ~ urban + livch + (1 | district)"
    b = df[df.district > 30]
    parts = {"a": df[df.district <= 30], "b": b[b.livch != "0"]}          # no childless women at site b
    exact = fedglmm.fit(formula, parts, method="iterative")
    res = fedglmm.fit(formula, parts, method="oneshot", min_group=1)
    assert list(res.fixef.index) == list(exact.fixef.index)
    _same(res, exact, 1e-6)


def test_summary_file_round_trip_equals_oneshot(tmp_path):
    df = pd.read_csv(DATA / "sleepstudy.csv")
    formula = "Reaction ~ Days + (Days | Subject)"
    sites = _sites(df, "Subject")
    files = []
    for sid, frame in sites.items():
        path = tmp_path / f"{sid}.json"
        path.write_text(json.dumps(to_jsonable(summarize(frame, formula, "gaussian", None, sid))))
        files.append(path)
    from_files = fedglmm.fit_summaries(files, formula)
    oneshot = fedglmm.fit(formula, sites, method="oneshot")
    _same(from_files, oneshot, 1e-10)


def test_summary_file_holds_no_row_level_value(tmp_path):
    """Every number in the file is a count, a sum over a group of ≥ 10 rows, or a site total."""
    df = pd.read_csv(DATA / "sleepstudy.csv")
    msg = to_jsonable(summarize(df, "Reaction ~ Days + (Days | Subject)", "gaussian", None, "A"))
    text = json.dumps(msg)
    for value in df.Reaction[df.Reaction % 1 != 0]:      # reaction times with decimals: none is in the file
        assert f"{value}" not in text, value
    g = msg["groups"]
    assert min(g["n"]) >= 10 and len(g["levels"]) == 18
    assert set(g) == {"levels", "n", "XtX", "Xty", "yty", "ZtX", "ZtZ", "Zty"}
    assert "about" in msg and "per group" in msg["about"]["groups"]


def test_small_groups_are_refused_with_advice():
    df = pd.read_csv(DATA / "cbpp.csv")
    formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
    msg = summarize(df, formula, "binomial", None, "A")
    assert msg["groups"] is None and "fewer than 10 rows" in msg["refused"] and "iterative" in msg["refused"]
    with pytest.raises(FedGLMMError, match="fewer than 10 rows"):
        fedglmm.fit(formula, df, family="binomial", method="oneshot")
    # the hybrid falls back to the Newton rounds and gets the iterative fit
    a = fedglmm.fit(formula, df, family="binomial", method="hybrid")
    b = fedglmm.fit(formula, df, family="binomial", method="iterative")
    assert np.allclose(a.fixef, b.fixef, atol=1e-8) and abs(a.loglik - b.loglik) < 1e-8


def test_summaries_for_another_formula_are_refused(tmp_path):
    df = pd.read_csv(DATA / "sleepstudy.csv")
    msg = to_jsonable(summarize(df, "Reaction ~ Days + (1 | Subject)", "gaussian", None, "A"))
    with pytest.raises(FedGLMMError, match="were made for"):
        fedglmm.fit_summaries([msg], "Reaction ~ Days + (Days | Subject)")
