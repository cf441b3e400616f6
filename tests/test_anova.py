"""Model comparison: lme4's anova() on nested pairs (tests/data/toolbox/anova.tsv; lme4 1.1-31, with the
REML->ML refit), the refusals, and the ``fedglmm anova`` command."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedglmm
from fedglmm import cli
from fedglmm.comparison import AnovaError, format_anova
from toolbox import DATA, case as named, fit, frame, table

CASES = {c["name"]: c for c in table("anova")}


def _fits(case, **kw):
    formulas = [case[k] for k in ("formula0", "formula1", "formula2") if case.get(k)]
    d = frame(case)
    return [fit(f, d, family=case["family"], nagq=max(int(case["nagq"]), 1), reml=case["reml"] == "1", **kw)
            for f in formulas]


@pytest.mark.parametrize("name", sorted(CASES))
def test_anova_matches_lme4(name):
    """Chisq to 1e-4, Pr(>Chisq) to 1e-6 relative, npar/Df/logLik as lme4 (the better of lme4 and
    glmmTMB where lme4 stopped short), the ML refit noted; models given in reverse order come back
    ordered by npar."""
    case = CASES[name]
    fits = _fits(case)
    tab = fedglmm.anova(*reversed(fits))
    ref = case["ref"]
    best = ref["best"]
    assert list(tab.columns) == ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]
    assert list(tab["npar"]) == [r["npar"] for r in ref["table"]]
    assert ("refitting model(s) with ML (instead of REML)" in tab.attrs["notes"]) \
        == bool(ref["refit_ml"])
    for i in range(1, len(best)):
        assert tab["Chisq"].iloc[i] == pytest.approx(best[i]["Chisq"], abs=1e-4)
        assert tab["Df"].iloc[i] == best[i]["Df"]
        assert tab["Pr(>Chisq)"].iloc[i] == pytest.approx(best[i]["Pr(>Chisq)"], rel=1e-6, abs=1e-300)
        assert tab["logLik"].iloc[i] == pytest.approx(best[i]["logLik"], abs=1e-4)
    assert np.isnan(tab["Chisq"].iloc[0]) and pd.isna(tab["Df"].iloc[0])


def test_refusals():
    d = pd.read_csv(DATA / "sleepstudy.csv")
    m0 = fedglmm.fit("Reaction ~ Days + (1 | Subject)", d)
    with pytest.raises(AnovaError, match="different responses: 'Reaction' .* 'log\\(Reaction\\)'"):
        fedglmm.anova(m0, fedglmm.fit("log(Reaction) ~ Days + (1 | Subject)", d))
    with pytest.raises(AnovaError, match="same rows: m0 has 180 observations, m1 has 170"):
        fedglmm.anova(m0, fedglmm.fit("Reaction ~ Days + (Days | Subject)", d.iloc[10:]))
    # the same number of rows, other rows: only the sites' keyed digests tell
    other = pd.concat([d.iloc[:170], d.iloc[:10].assign(Reaction=d.Reaction.iloc[:10] + 1.0)])
    with pytest.raises(AnovaError, match="site 'site1' used different rows"):
        fedglmm.anova(m0, fedglmm.fit("Reaction ~ Days + (Days | Subject)", other))
    cb = pd.read_csv(DATA / "cbpp.csv")
    f = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
    with pytest.raises(AnovaError, match="different families"):
        fedglmm.anova(fedglmm.fit(f, cb, family="binomial"), fedglmm.fit(f, cb, family="binomial", link="probit"))
    with pytest.raises(AnovaError, match="at least two"):
        fedglmm.anova(m0)


def test_same_rows_over_sites_pass():
    """Three sites, REML fits: the refit rounds run at the sites and the table equals the pooled one."""
    case = named(CASES, "sleepstudy_int_slope")
    d = frame(case)
    sites = {f"s{k}": d[d.Subject % 3 == k] for k in range(3)}
    split = fedglmm.anova(*[fedglmm.fit(case[k], sites) for k in ("formula0", "formula1")])
    pooled = fedglmm.anova(*_fits(case))
    assert np.allclose(split[["logLik", "Chisq"]].to_numpy()[1], pooled[["logLik", "Chisq"]].to_numpy()[1], rtol=1e-8)
    assert split.attrs["rounds"] > 0 and "Chisq" in format_anova(split)


def test_cli_anova(tmp_path):
    runner = CliRunner()
    case = named(CASES, "cbpp_period")
    out = tmp_path / "anova.json"
    r = runner.invoke(cli.app, ["anova", "-f", case["formula0"], "-f", case["formula1"], "--family", "binomial",
                                "--json", str(out), str(DATA / "cbpp.csv")])
    assert r.exit_code == 0, r.output
    assert "Pr(>Chisq)" in r.stdout and "m1: " + case["formula1"] in r.stdout
    got = json.loads(out.read_text())
    assert got["table"][1]["Chisq"] == pytest.approx(case["ref"]["best"][1]["Chisq"], abs=1e-4)
    r = runner.invoke(cli.app, ["anova", "-f", case["formula0"], "--family", "binomial", str(DATA / "cbpp.csv")])
    assert r.exit_code == 2 and "at least two models" in r.output
    r = runner.invoke(cli.app, ["anova", "-f", "Reaction ~ Days + (1 | Subject)", "-f",
                                "log(Reaction) ~ Days + (1 | Subject)", str(DATA / "sleepstudy.csv")])
    assert r.exit_code == 1 and "different responses" in r.output
