"""Profile-likelihood intervals against lme4's confint(method = "profile") (tests/data/toolbox/profile.tsv,
lme4 1.1-31; where lme4's profile failed, the reference's exact root-finding intervals), all intervals of
a model in at most 12 rounds, and the same over sites as pooled."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fedglmm
from toolbox import case as named, fit, frame, table

CASES = {c["name"]: c for c in table("profile")}


def r_name(name: str) -> str:
    name = name.replace("Intercept", "(Intercept)").replace("((Intercept))", "(Intercept)")
    return name.replace("[T.", "").replace("]", "").replace(" ** ", "^")


def reference(case, level):
    """The reference's exact root-finding intervals where it has them (lme4's spline through its profile
    points is off by up to 1.4 % of the width on contraception_slope; the exact ends are not), else
    lme4's confint(method = "profile")."""
    ref = case["ref"]
    exact = (ref.get("exact") or {}).get("intervals")
    if exact:
        return {k: (v["lower"], v["upper"]) for k, v in exact[f"{level:g}"].items()}
    return {k: tuple(v) for k, v in ref["intervals"][f"{level:g}"].items()}


def _fit(case, data=None):
    return fit(case["formula"], frame(case) if data is None else data, family=case["family"],
               link=case["link"] or None, nagq=max(int(case["nagq"]), 1), reml=case["reml"] == "1")


@pytest.mark.parametrize("name", sorted(CASES))
def test_profile_matches_lme4(name):
    """Every endpoint within 1 % of the reference interval's width, at 95 % and 90 %; ≤ 12 rounds."""
    case = CASES[name]
    res = _fit(case)
    for level in (0.95, 0.9):
        ci = res.conf_int(level, method="profile")
        ref = reference(case, level)
        assert sorted(r_name(k) for k in ci.index) == sorted(ref), (list(ci.index), list(ref))
        assert ci.attrs["rounds"] <= 12 and not ci.attrs["not_found"]
        for k, (lo, hi) in ci.iterrows():
            rlo, rhi = ref[r_name(k)]
            width = rhi - rlo
            assert abs(lo - rlo) <= 0.01 * width and abs(hi - rhi) <= 0.01 * width, (k, lo, hi, rlo, rhi)
    assert list(ci.columns) == ["5 %", "95 %"]
    assert res.after_fit["profile"]["rounds"] == sum(t.attrs["rounds"] for t in res.profiles.values())


def test_profile_over_sites_equals_pooled():
    case = named(CASES, "cbpp_la")
    d = frame(case)
    sites = {f"s{k}": d[d.herd.astype("category").cat.codes % 3 == k] for k in range(3)}
    a, b = _fit(case).conf_int(method="profile"), _fit(case, sites).conf_int(method="profile")
    assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, atol=1e-8)


def test_sd_at_zero_has_lower_bound_zero():
    """A random intercept with (almost) no variance: the profile never reaches the cut below, so the
    lower end of its SD is 0 (as lme4); its upper end and the fixed effects are still found."""
    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(12), 8)
    d = pd.DataFrame({"g": g, "x": rng.normal(size=g.size)})
    d["y"] = 1.0 + 0.5 * d.x + 0.03 * rng.normal(size=12)[g] + rng.normal(size=g.size)
    res = fedglmm.fit("y ~ x + (1 | g)", d, reml=False)
    ci = res.conf_int(method="profile")
    assert ci.loc["sd_Intercept|g"].iloc[0] == 0.0 and ci.loc["sd_Intercept|g"].iloc[1] > 0.1
    assert ci.notna().all().all() and ci.attrs["rounds"] <= 12


def test_profile_needs_the_sites(tmp_path):
    case = named(CASES, "cbpp_la")
    res = _fit(case)
    res.session.link.closed = True
    with pytest.raises(fedglmm.FedGLMMError, match="can no longer be reached"):
        res.conf_int(method="profile")
