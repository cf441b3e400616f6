"""Diagnostics without rows: binned residual aggregates from the sites (pooled = split), the uniformity and
dispersion tests on simulated data, no row-sized array in any message, posterior means of the random
effects against R (adaptive quadrature with 50 nodes, tests/data/toolbox/varcorr_*.json)."""
from __future__ import annotations

import re

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.api import make_sites
from fedglmm.coordinator.diagnostics import pool, posterior_means, run_diagnostics
from fedglmm.coordinator.session import Link, Session
from fedglmm.transport import InProcessTransport
from toolbox import DATA, fit, frame, table


def _at_sites(res, frames: dict, config=None) -> Session:
    """The fit's session (same point, same internal scale) over other sites holding the same rows."""
    s = res.session
    return replace(s, link=Link(InProcessTransport(make_sites(frames, config=config)), s.link.setup))


def _split(d, col, k=3):
    codes = d[col].astype("category").cat.codes
    return {f"s{i}": d[codes % k == i].sample(frac=1.0, random_state=i) for i in range(k)}   # rows shuffled


def _arrays(diag):
    return {"u": diag.u["count"], "pearson": diag.pearson["count"], **{f"fit_{k}": diag.fitted[k]
            for k in ("count", "fit", "res", "var")}, "draws": np.array(list(diag.draws.values()))}


@pytest.mark.parametrize("formula,family,data,group", [
    ("Reaction ~ Days + (Days | Subject)", "gaussian", "sleepstudy.csv", "Subject"),
    ("use ~ urban + age + livch + (urban | district)", "binomial", "contraception.csv", "district"),
    ("cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial", "cbpp.csv", "herd")])
def test_aggregates_over_sites_equal_pooled(formula, family, data, group):
    """At the same fitted point, the binned aggregates summed over 3 sites (rows shuffled) equal the pooled
    data's: counts exactly, sums to rounding -- the randomised ones too (per-group seeds)."""
    d = pd.read_csv(DATA / data)
    res = fedglmm.fit(formula, d, family=family)
    pooled = run_diagnostics(res.session, seed=3)
    split = run_diagnostics(_at_sites(res, _split(d, group)), seed=3)
    for k, v in _arrays(pooled).items():
        assert np.allclose(v, _arrays(split)[k], rtol=1e-10, atol=1e-9), k
    assert pooled.uniformity() == pytest.approx(split.uniformity())
    other = run_diagnostics(res.session, seed=4)
    assert not np.array_equal(other.u["count"], pooled.u["count"])          # the seed matters


def test_small_bins_are_merged_and_coarsening_matches_pooled():
    """Sites with min_cell = 5 send no bin of fewer than 5 rows; on the common coarsening the pooled
    data's counts are the sum of the sites'."""
    d = pd.read_csv(DATA / "contraception.csv")
    res = fedglmm.fit("use ~ urban + age + livch + (1 | district)", d, family="binomial")
    rules = fedglmm.SiteConfig(min_rows=10, min_cell=5, min_group=1)
    session = _at_sites(res, _split(d, "district"), rules)
    replies = session.broadcast(__import__("fedglmm.coordinator.diagnostics", fromlist=["x"]).inspect_request(
        session, ["residuals"], 1), "test")
    for r in replies.values():
        for key in ("u", "pearson", "fitted"):
            assert r["residuals"][key]["count"].min() >= 5, key
    split = run_diagnostics(session, seed=1)
    pooled = run_diagnostics(res.session, seed=1)
    for key, nb in (("u", 100), ("pearson", 242)):
        coarse = pool([{"cuts": getattr(split, key)["cuts"], "count": np.zeros(len(getattr(split, key)["count"]))},
                       dict(getattr(pooled, key))], nb)
        assert np.array_equal(coarse["count"], getattr(split, key)["count"]), key


def test_no_message_carries_a_row_sized_array(monkeypatch):
    """Every array in every reply of a fit with profile intervals, diagnostics and posterior means has
    the same shape whether the sites hold n or 3n rows (the same groups)."""
    from fedglmm.site import Site

    shapes = []
    handle = Site.handle

    def spy(self, data):
        out = handle(self, data)
        from fedglmm import protocol

        def walk(obj, path):
            if isinstance(obj, np.ndarray):
                shapes[-1].append((path, obj.shape))
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(v, f"{path}/{k}")
            elif isinstance(obj, list):
                for i, v in enumerate(obj):
                    walk(v, f"{path}/{i}")
        walk(protocol.decode(out), self.site_id)
        return out

    monkeypatch.setattr(Site, "handle", spy)
    d = pd.read_csv(DATA / "cbpp.csv")
    runs = []
    for copies in (1, 3):
        shapes.append([])
        big = pd.concat([d] * copies, ignore_index=True)
        res = fedglmm.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", _split(big, "herd"),
                          family="binomial", ci="profile", diagnostics=True, method="iterative")
        res.ranef(kind="mean")
        # the kinds of arrays and their shapes (how many points a round carries may differ with the data)
        runs.append(sorted({(re.sub(r"/\d+(?=/|$)", "/*", path), shape) for path, shape in shapes[-1]}))
    # (which rounds bring third derivatives, and fourth along a direction, at which of their points, may differ
    # with the data too: where they come, their shape is the parameters')
    extra = ("/third", "/quartic")
    third = [{(path[path.rindex("/"):], shape) for path, shape in run if path.endswith(extra)} for run in runs]
    runs = [[(path, shape) for path, shape in run if not path.endswith(extra)] for run in runs]
    assert runs[0] == runs[1] and len(runs[0]) > 20
    assert all(len({shape for key, shape in third[0] | third[1] if key == k}) <= 1 for k in extra)


def _simulate(rng, family, G=40, n=12, od=0.0):
    g = np.repeat(np.arange(G), n)
    x = rng.normal(size=g.size)
    eta = -0.3 + 0.6 * x + 0.8 * rng.normal(size=G)[g]
    if family == "binomial":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    else:
        mu = np.exp(eta + 0.5)
        y = rng.poisson(mu if od == 0 else rng.gamma(1 / od, mu * od))
    return pd.DataFrame({"y": y, "x": x, "g": g})


def test_uniformity_holds_on_data_from_the_model():
    """20 data sets simulated from GLMMs with small groups: the uniformity test rejects at 1 % at most
    twice (its level); the dispersion test likewise.  (benchmarks/bench_diagnostics.py: 100 replicates.)"""
    rng = np.random.default_rng(2024)
    rejected_u = rejected_d = 0
    for rep in range(20):
        family = "binomial" if rep % 2 else "poisson"
        res = fedglmm.fit("y ~ x + (1 | g)", _simulate(rng, family), family=family, diagnostics=True, seed=rep)
        rejected_u += res.diagnostics.uniformity()["p_value"] < 0.01
        rejected_d += res.diagnostics.dispersion()["p_value"] < 0.01
    assert rejected_u <= 2 and rejected_d <= 2


def test_overdispersion_is_detected():
    rng = np.random.default_rng(11)
    d = _simulate(rng, "poisson", od=0.5)
    res = fedglmm.fit("y ~ x + (1 | g)", d, family="poisson", diagnostics=True)
    disp = res.diagnostics.dispersion()
    assert disp["ratio"] > 1.3 and disp["p_value"] < 1e-4
    text = res.summary()
    assert "Scaled residuals" in text and "dispersion: ratio" in text


POSTERIOR = [c for c in table("varcorr") if c["ref"].get("posterior_means")]


@pytest.mark.parametrize("case", POSTERIOR, ids=[c["name"] for c in POSTERIOR])
def test_posterior_means_match_r(case):
    """At R's parameters, each group's posterior mean and SD (15 nodes) within 1e-4 of R's (50 nodes)."""
    from fedglmm.results import FitResult  # noqa: F401

    res = fit(case["formula"], frame(case), family=case["family"], link=case["link"] or None,
              nagq=max(int(case["nagq"]), 1), reml=case["reml"] == "1")
    pm = case["ref"]["posterior_means"]
    at = pm["at"]
    st = res.session.setup
    beta = np.array(list(at["fixef"].values()))
    gamma = np.linalg.solve(st.A, beta)
    theta = np.array([at["sd"]]) * st.zs
    session = res.session.with_estimate(replace(res.session.estimate, gamma=gamma, theta=theta))
    levels, mean, sd, _ = posterior_means(session)
    got = pd.DataFrame({"mean": mean[:, 0] / st.zs[0], "sd": sd[:, 0] / st.zs[0]}, index=levels)
    ref = pd.DataFrame({"mean": pm["mean"], "sd": pm["sd"]}, index=[str(v) for v in pm["levels"]])
    got = got.reindex(ref.index)
    assert np.max(np.abs(got["mean"] - ref["mean"])) < 1e-4
    assert np.max(np.abs(got["sd"] - ref["sd"])) < 1e-4
    # and at our own estimate, through the result: posterior means differ from the modes
    mean_, sd_ = res.ranef(kind="mean", condvar=True)
    assert list(mean_.index) == list(res.ranef().index)
    assert np.max(np.abs(mean_.to_numpy() - res.ranef().to_numpy())) > 1e-3


def test_gaussian_posterior_means_are_the_modes():
    d = pd.read_csv(DATA / "sleepstudy.csv")
    res = fedglmm.fit("Reaction ~ Days + (Days | Subject)", d)
    mean, sd = res.ranef(kind="mean", condvar=True)
    # the same to the fit's precision (the modes were computed one Newton step before the estimate)
    scale = np.abs(res.ranef().to_numpy()).max()
    assert np.allclose(mean.to_numpy(), res.ranef().to_numpy(), rtol=0, atol=1e-4 * scale)
    assert np.allclose(sd, res.condsd, rtol=1e-4)


def test_singular_fit_diagnostics_run():
    """A random slope with no variance (a singular covariance): the exact gaussian draw still exists."""
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(20), 6)
    x = rng.normal(size=g.size)
    d = pd.DataFrame({"y": 1 + 0.5 * x + rng.normal(size=20)[g] + rng.normal(size=g.size), "x": x, "g": g})
    res = fedglmm.fit("y ~ x + (x | g)", d, diagnostics=True)
    assert any("singular" in m for m in res.messages)
    assert res.diagnostics.uniformity()["n"] == len(d)
