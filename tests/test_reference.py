"""Parity with lme4 / glmmTMB on every reference case (the issue's acceptance criteria).

For each case: converged in at most 12 rounds; full logLik ≥ the better reference − 1e-4; every fixed effect
within 0.1 SE of a reference; SEs and random-effect SDs within 5 % of a reference.  References whose
optimiser stopped early (lme4 warnings) are still listed, which is why "a reference" suffices.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fedglmm
from reference import cases, full_loglik, r_name, ref_sds

CASES = cases()


def _fit(case, **kw):
    data = pd.read_csv(case["data"])
    return fedglmm.fit(case["formula"], data, family=case["family"], link=case["link"], nagq=case["nagq"],
                       reml=case["reml"], **kw)


@pytest.fixture(scope="module")
def fits():
    return {c["name"]: _fit(c) for c in CASES}


def _close_to_some(value, refs, tol):
    return min(abs(value - r) / abs(r) for r in refs) <= tol


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_references(case, fits):
    res = fits[case["name"]]
    refs = case["refs"]
    assert res.converged
    assert res.rounds <= 12
    best = max(full_loglik(r, case) for r in refs)
    assert res.loglik >= best - 1e-4, (res.loglik, best)
    for name, est in res.fixef.items():
        rn = r_name(name)
        dist = [abs(est - r["fixef"][rn]) / r["se"][rn] for r in refs if rn in r.get("fixef", {})]
        assert dist and min(dist) <= 0.1, (name, dist)
        assert _close_to_some(res.se[name], [r["se"][rn] for r in refs if rn in r.get("se", {})], 0.05), name
    ours = [r["sd"] for r in res.random if "sd" in r]
    if res.residual_sd is not None:
        ours.append(res.residual_sd)
    for i, sd in enumerate(ours):
        cand = [ref_sds(r)[i] for r in refs if len(ref_sds(r)) == len(ours)]
        assert cand and _close_to_some(sd, cand, 0.05), (i, sd, cand)
    corr = [r["corr"] for r in res.random if "corr" in r]
    lme4_corr = [v["sdcor"] for v in refs[0].get("varcorr", []) if v.get("var2") and v["grp"] != "Residual"]
    assert np.allclose(corr, lme4_corr, atol=0.02)


@pytest.mark.parametrize("case", [c for c in CASES if c["link"] in ("probit", "cloglog")],
                         ids=lambda c: c["name"])
def test_expected_curvature_reproduces_glmer(case):
    """With lme4's Fisher-weight curvature the fit is glmer's: same logLik and estimates."""
    res = _fit(case, curvature="expected")
    ref = case["refs"][0]
    assert ref["engine"].startswith("lme4")
    assert res.loglik >= ref["logLik"] - 1e-4
    for name, est in res.fixef.items():
        assert abs(est - ref["fixef"][r_name(name)]) <= 0.02 * ref["se"][r_name(name)]


@pytest.mark.parametrize("case", [c for c in CASES if c["refs"][0].get("ranef")], ids=lambda c: c["name"])
def test_conditional_modes_match_lme4(case, fits):
    res = fits[case["name"]]
    ref = case["refs"][0]
    (grp, rows), = ref["ranef"].items()
    tab = pd.DataFrame(rows).set_index("level")
    modes = res.ranef()
    modes.index = modes.index.astype(str)
    tab.index = tab.index.astype(str)
    sds = [r["sd"] for r in res.random if "sd" in r]
    for j, col in enumerate(modes.columns):
        diff = np.abs(modes[col].to_numpy() - tab.loc[modes.index, r_name(col)].to_numpy())
        assert diff.max() <= 0.02 * sds[j] + 1e-6, (col, diff.max())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parameter_count_matches_lme4(case, fits):
    ref = case["refs"][0]
    if "AIC" not in ref:
        pytest.skip("no AIC in reference")
    k_ref = (ref["AIC"] + 2 * ref["logLik"]) / 2
    assert fits[case["name"]].n_params == round(k_ref)
