"""Federation: the same data split over sites gives the pooled fit, and only sums leave a site."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.api import make_sites
from fedglmm.errors import FedGLMMError
from fedglmm.methods.iterative import fit_iterative
from fedglmm.model.options import fit_request
from fedglmm.transport import InProcessTransport
from recording import Recorder

DATA = Path(__file__).parent / "data"


def _split_by_group(df, group, nsites, seed=0):
    levels = df[group].unique()
    rng = np.random.default_rng(seed)
    owner = dict(zip(levels, rng.integers(0, nsites, len(levels))))
    return {f"s{k}": df[df[group].map(owner) == k].reset_index(drop=True) for k in range(nsites)}


def _assert_same(a, b, tol=1e-8):
    assert np.allclose(a.fixef, b.fixef, rtol=0, atol=tol)
    assert np.allclose(a.se, b.se, rtol=0, atol=tol)
    assert abs(a.loglik - b.loglik) <= tol * max(1.0, abs(a.loglik))
    sa = [r.get("sd", r.get("corr")) for r in a.random]
    sb = [r.get("sd", r.get("corr")) for r in b.random]
    assert np.allclose(sa, sb, rtol=0, atol=tol)
    if a.residual_sd is not None:
        assert abs(a.residual_sd - b.residual_sd) <= tol
    ma, mb = a.ranef(), b.ranef()
    assert list(ma.index) == list(mb.index)
    assert np.allclose(ma.to_numpy(), mb.to_numpy(), rtol=0, atol=1e-7)


SPLITS = [
    ("contraception.csv", "use ~ urban + age + livch + (urban | district)", "binomial", {}, "district"),
    ("contraception.csv", "use ~ urban + age + I(age**2) + livch + (1 | district)", "binomial", {"nagq": 10},
     "district"),
    ("sleepstudy.csv", "Reaction ~ Days + (Days | Subject)", "gaussian", {}, "Subject"),
    ("sleepstudy.csv", "Reaction ~ Days + (Days || Subject)", "gaussian", {"reml": False}, "Subject"),
    ("extra_sim_pois_offset.csv", "y ~ x + offset(log(t)) + (1 | g)", "poisson", {"nagq": 5}, "g"),
    ("cbpp.csv", "cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial",
     {"link": "probit"}, "herd"),
]


@pytest.mark.parametrize("fname,formula,family,kw,group", SPLITS, ids=[s[1][:40] + str(s[3]) for s in SPLITS])
def test_split_equals_pooled(fname, formula, family, kw, group):
    """The iterative method's rounds are the same whatever the split (sums add up): equal to 1e-8."""
    df = pd.read_csv(DATA / fname)
    pooled = fedglmm.fit(formula, df, family=family, method="iterative", **kw)
    for nsites in (2, 5):
        split = fedglmm.fit(formula, _split_by_group(df, group, nsites), family=family, method="iterative", **kw)
        assert split.nsites == nsites
        _assert_same(pooled, split)


@pytest.mark.parametrize("fname,formula,family,kw,group", SPLITS, ids=[s[1][:40] + str(s[3]) for s in SPLITS])
def test_hybrid_split_equals_pooled(fname, formula, family, kw, group):
    """The hybrid (the default) starts from split-dependent summaries but ends at the same estimates
    (1e-8); standard errors come from the Hessian at the last point visited, moved to the estimate by
    a secant step, and agree to a relative 1e-4."""
    df = pd.read_csv(DATA / fname)
    pooled = fedglmm.fit(formula, df, family=family, **kw)
    for nsites in (2, 5):
        split = fedglmm.fit(formula, _split_by_group(df, group, nsites), family=family, **kw)
        assert split.nsites == nsites and split.rounds <= 4
        assert np.allclose(pooled.fixef, split.fixef, rtol=0, atol=1e-8)
        assert np.allclose(pooled.theta, split.theta, rtol=0, atol=1e-8)
        assert abs(pooled.loglik - split.loglik) < 1e-8
        assert np.allclose(pooled.se, split.se, rtol=1e-4, atol=0)


def test_site_column_equals_list_of_frames():
    df = pd.read_csv(DATA / "extra_sim_pois_big.csv")
    a = fedglmm.fit("y ~ x1 + x2 + (1 | g)", df, family="poisson", site="site", method="iterative")
    b = fedglmm.fit("y ~ x1 + x2 + (1 | g)", [g for _, g in df.groupby("site")], family="poisson",
                    method="iterative")
    assert a.nsites == 6
    _assert_same(a, b)


def test_glm_without_random_effects_splits_by_rows():
    df = pd.read_csv(DATA / "contraception.csv")
    pooled = fedglmm.fit("use ~ urban + age + livch", df, family="binomial", method="iterative")
    split = fedglmm.fit("use ~ urban + age + livch", [df.iloc[::2], df.iloc[1::2]], family="binomial",
                        method="iterative")
    assert np.allclose(pooled.fixef, split.fixef, atol=1e-10)
    assert pooled.random == [] and pooled.method == "GLM"


def test_group_at_two_sites_is_shared_for_gaussian_and_binomial_and_refused_otherwise():
    df = pd.read_csv(DATA / "sleepstudy.csv")
    parts = [df.iloc[:95], df.iloc[95:]]                  # subject 337's days at both sites
    res = fedglmm.fit("Reaction ~ Days + (1 | Subject)", parts)
    pooled = fedglmm.fit("Reaction ~ Days + (1 | Subject)", df)
    assert abs(res.loglik - pooled.loglik) < 1e-6
    assert "levels shared by sites (Subject: 1 of 18 levels at 2 sites each)" in res.summary()
    counts = [df.assign(Reaction=(df.Reaction > 300).astype(int)).iloc[s] for s in (slice(0, 95), slice(95, None))]
    res = fedglmm.fit("Reaction ~ Days + (1 | Subject)", counts, family="binomial")
    pooled = fedglmm.fit("Reaction ~ Days + (1 | Subject)", pd.concat(counts), family="binomial")
    assert abs(res.loglik - pooled.loglik) < 1e-6
    with pytest.raises(FedGLMMError, match="level .337. is present at sites .site1. and .site2.") as err:
        fedglmm.fit("Reaction ~ Days + (1 | Subject)", counts, family="negative_binomial")
    assert "\n" not in str(err.value)


def _arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _arrays(v)


@pytest.mark.parametrize("family,formula,kw", [
    ("binomial", "use ~ urban + age + livch + (urban | district)", {}),
    ("gaussian", "age ~ urban + livch + (1 | district)", {}),
])
def test_only_sums_leave_a_site(family, formula, kw):
    """No reply holds anything sized like the rows; per-group arrays appear only in the final round."""
    df = pd.read_csv(DATA / "contraception.csv")
    sites = {k: Recorder(s) for k, s in make_sites(_split_by_group(df, "district", 3)).items()}
    transport = InProcessTransport(sites)
    res = fit_iterative(transport, fit_request(formula, family, method="iterative", **kw))
    assert res.rounds == len(next(iter(sites.values())).replies)
    assert res.bytes_to_sites > 0 and res.bytes_from_sites > 0
    for rec in sites.values():
        n = len(rec.site.frame)
        groups = rec.site.frame["district"].nunique()
        for i, reply in enumerate(rec.replies):
            for arr in _arrays(reply):
                assert n not in arr.shape, (i, arr.shape)
                if i < len(rec.replies) - 1:
                    assert groups not in arr.shape or groups <= 6, (i, arr.shape)
        last = rec.replies[-1]
        assert len(last["levels"]) == groups and last["modes"].shape[0] == groups
