"""Grouping factors whose levels are shared by several sites (gaussian models, exact ML/REML).

* the coordinator's pooled sums (:class:`fedglmm.likelihood.lmm_shared.SharedLMM`) from the sites' shared
  sums against the dense V = I + ZΛΛᵀZᵀ of the pooled rows (A, b, c, log det V), and their θ-derivatives
  (the coupled gradient and Hessian through the shared block) against central differences;
* held-out fits split over sites by the reference's own site column (``sim_teachers``: teachers at 2-4
  of 8 sites; ``scotssec``: primary schools feeding several secondaries): the pooled fit to 1e-6 in
  logLik and 1e-6 of an SE in the estimates, both factors' conditional modes and SDs, and lme4's numbers
  under the parity criteria of ``tests/multilevel_reference.py``;
* one grouping factor shared (``(1 + x | teacher)`` split by site);
* what reaches the coordinator: every array a site sends has the same shape when each row is doubled (no
  array grows with the rows);
* refusals: the one-shot method (binomial and poisson models: ``tests/test_shared_glmm.py``).
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:
    import fedglmm  # noqa: F401
except ImportError:      # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from multilevel_reference import cases, compare, fit, split_sites

import fedglmm
from fedglmm.analysis import profile_intervals
from fedglmm.api import fit_on
from fedglmm.coordinator.schema import merge_schema
from fedglmm.errors import FedGLMMError, SiteRefusal
from fedglmm.likelihood.lmm_shared import SharedLMM, SharedLMMSums, SUM_KEYS, to_global
from fedglmm.likelihood.setup import sum_replies
from fedglmm.likelihood.shared import SharedLayout
from fedglmm.model.design import build_design, describe_frame
from fedglmm.model.families import get_family
from fedglmm.model.formula import parse_formula
from fedglmm.model.spec import theta_index
from fedglmm.site import Site, SiteConfig
from fedglmm.transport.inprocess import InProcessTransport

CASES = {c["name"]: c for c in cases("heldout")}


def _simulated(seed=3, nsites=3, n=150):
    """Crossed design: subjects local to a site, items shared (some at every site, some at one)."""
    rng = np.random.default_rng(seed)
    site = rng.integers(0, nsites, n)
    subject = site * 100 + rng.integers(0, 8, n)
    item = rng.integers(0, 7, n)
    item[site == 0] = np.where(rng.random(np.sum(site == 0)) < 0.3, 9, item[site == 0])   # item 9: site 0 only
    x = rng.normal(size=n)
    u = rng.normal(size=1000)[subject] + (0.7 * rng.normal(size=10))[item] + 0.4 * rng.normal(size=10)[item] * x
    return pd.DataFrame({"y": 1.0 + 0.5 * x + u + rng.normal(size=n), "x": x, "site": site,
                         "subject": [f"s{k}" for k in subject], "item": [f"i{k}" for k in item]})


FORMULA = "y ~ x + (1 | subject) + (1 + x | item)"


def _designs(df, formula):
    spec, fam = parse_formula(formula), get_family("gaussian")
    parts = {f"site{s}": d.reset_index(drop=True) for s, d in df.groupby("site")}
    schema = merge_schema({s: describe_frame(d, spec, s) for s, d in parts.items()}, spec, fam)
    designs = {s: build_design(spec, schema, d, fam, s) for s, d in parts.items()}
    pooled = build_design(spec, schema, df, fam, "all")
    return schema, designs, pooled


def _pool(schema, designs, pooled):
    layout = SharedLayout.from_payload({f: list(lv) for f, lv in schema.shared.items()},
                                       {f.name: f.q for f in pooled.groupings})
    zcols = {f.name: np.asarray(f.columns) for f in pooled.groupings}
    engines = {s: SharedLMMSums(d, layout) for s, d in designs.items()}
    return engines, SharedLMM(layout, pooled.theta_mask, zcols, pooled.X.shape[1])


def _dense(pooled, theta):
    """A, b, c, log det V from V = I + ZΛΛᵀZᵀ over the pooled rows (every level its own columns)."""
    mask = np.asarray(pooled.theta_mask, bool)
    lam = np.zeros(mask.shape)
    lam[theta_index(mask)] = theta
    blocks = []
    for f in pooled.groupings:
        Zf, lf = pooled.Z[:, f.columns], lam[np.ix_(f.columns, f.columns)]
        onehot = np.eye(len(f.levels))[f.codes]
        blocks.append((onehot[:, :, None] * (Zf @ lf)[:, None, :]).reshape(pooled.n, -1))
    ZL = np.hstack(blocks)
    V = np.eye(pooled.n) + ZL @ ZL.T
    Xy = np.c_[pooled.X, pooled.y]
    K = Xy.T @ np.linalg.solve(V, Xy)
    p = pooled.X.shape[1]
    return K[:p, :p], K[:p, p], K[p, p], np.linalg.slogdet(V)[1]


def test_pooled_sums_equal_the_dense_covariance_of_the_pooled_rows():
    schema, designs, pooled = _designs(_simulated(), FORMULA)
    assert set(schema.shared) == {"item"} and "i9" not in schema.shared["item"]
    engines, pool = _pool(schema, designs, pooled)
    theta = np.array([0.8, 0.6, -0.2, 0.5])
    tot = sum_replies({s: to_global(e.sums(theta), pool.Q) for s, e in engines.items()}, SUM_KEYS)
    s = pool.pooled_sums(tot, theta)
    A, b, c, d = _dense(pooled, theta)
    assert np.allclose(s["A"], A, rtol=1e-10) and np.allclose(s["b"], b, rtol=1e-10)
    assert abs(s["c"] - c) < 1e-9 * c and abs(s["d"] - d) < 1e-9 * abs(d)


def test_coupled_derivatives_against_central_differences():
    """dA, db, dc, dd (analytic through the shared block) and their second derivatives against central
    differences of the pooled sums, the sites' sums re-evaluated at each θ."""
    schema, designs, pooled = _designs(_simulated(seed=5), FORMULA)
    engines, pool = _pool(schema, designs, pooled)
    theta = np.array([0.9, 0.5, 0.3, 0.4])

    def at(t, order=2):
        tot = sum_replies({s: to_global(e.sums(t), pool.Q) for s, e in engines.items()}, SUM_KEYS)
        return pool.pooled_sums(tot, t, order=order)

    s = at(theta)
    h = 1e-5
    for t in range(len(theta)):
        e = np.zeros(len(theta))
        e[t] = h
        up, dn = at(theta + e), at(theta - e)
        for key in ("A", "b", "c", "d"):
            fd = (np.asarray(up[key]) - np.asarray(dn[key])) / (2 * h)
            assert np.allclose(s["d" + key][t], fd, rtol=1e-6, atol=1e-6), key
            fd2 = (np.asarray(up["d" + key]) - np.asarray(dn["d" + key])) / (2 * h)
            assert np.allclose(s["d2" + key][t], fd2, rtol=1e-4, atol=1e-4), "d2" + key


def _close_to_pooled(res, pooled, modes=True, atol=1e-5):
    assert abs(res.loglik - pooled.loglik) < 1e-6
    assert np.all(np.abs(res.fixef - pooled.fixef) / pooled.se < 1e-6)
    assert np.allclose(res.se, pooled.se, rtol=1e-6)
    assert np.allclose(res.theta, pooled.theta, rtol=1e-6, atol=1e-8)
    if not modes:
        return
    (m, sd), (pm, psd) = res.ranef(condvar=True, by_factor=True), pooled.ranef(condvar=True, by_factor=True)
    for f in pm:
        assert set(m[f].index) == set(pm[f].index)
        assert np.allclose(m[f].loc[pm[f].index], pm[f], atol=atol)
        assert np.allclose(sd[f].loc[pm[f].index], psd[f], rtol=atol)


@pytest.mark.parametrize("name, method", [("sim_teachers_reml", "iterative"), ("scotssec_ml", "hybrid")])
def test_split_by_site_gives_the_pooled_fit_and_lme4s(name, method):
    case = CASES[name]
    pooled = fit(case, method="iterative", min_group=1)
    res = fit(case, data=split_sites(case), method=method, min_group=1)
    assert res.rounds <= 8
    _close_to_pooled(res, pooled)
    assert compare(res, case) == []
    assert "shared" in res.summary()


def test_one_shared_factor():
    df = pd.read_csv(CASES["sim_teachers_reml"]["data"])
    formula = "score ~ x + (1 | teacher)"
    pooled = fedglmm.fit(formula, df, method="iterative", min_group=1)
    res = fedglmm.fit(formula, df, site="site", min_group=1)
    # the pooled one-factor engine reports its modes at its last Newton point (θ within 1e-6 of ours)
    _close_to_pooled(res, pooled, atol=1e-3)
    assert res.ngroups == {"teacher": 400}


def _every_level_at_every_site(seed=7, n=2000, levels=8, nsites=3):
    """A gaussian random intercept and slope, every level's rows dealt to the sites at random."""
    rng = np.random.default_rng(seed)
    g, x = rng.integers(0, levels, n), rng.normal(size=n)
    y = 2 + 0.5 * x + rng.normal(0, 0.7, levels)[g] + 0.3 * rng.normal(size=levels)[g] * x + rng.normal(size=n)
    df = pd.DataFrame({"y": y, "x": x, "g": g})
    site = rng.integers(0, nsites, n)
    return df, {f"s{k}": df[site == k].reset_index(drop=True) for k in range(nsites)}


@pytest.mark.parametrize("reml, method", [(True, "hybrid"), (False, "hybrid"), (True, "oneshot")])
def test_one_shared_factor_fitted_from_the_one_shot_round(reml, method):
    """Each (site, level) cell's sums from the one-shot round, added up by level, are the pooled rows'
    per-level sufficient statistics: the default method's fit is the pooled one after that round alone
    (5-6 rounds in all before), every level counted once; the one-shot method, which refused shared
    levels, fits them so too."""
    df, sites = _every_level_at_every_site()
    pooled = fedglmm.fit("y ~ x + (x | g)", df, reml=reml)
    res = fedglmm.fit("y ~ x + (x | g)", sites, reml=reml, method=method)
    assert res.rounds == 1
    assert abs(res.loglik - pooled.loglik) < 1e-9
    assert np.allclose(res.fixef, pooled.fixef, rtol=1e-10, atol=1e-12)
    assert np.allclose(res.se, pooled.se, rtol=1e-9)
    assert np.allclose(res.theta, pooled.theta, rtol=1e-9)
    (m, sd), (pm, psd) = res.ranef(condvar=True, by_factor=True), pooled.ranef(condvar=True, by_factor=True)
    assert np.allclose(m["g"].loc[pm["g"].index], pm["g"], atol=1e-10)
    assert np.allclose(sd["g"].loc[pm["g"].index], psd["g"], rtol=1e-9)
    assert res.ngroups == {"g": 8}
    assert any("fitted exactly from the one-shot round" in msg for msg in res.messages)


@pytest.mark.parametrize("method", ["hybrid", "oneshot"])
def test_follow_ups_of_a_shared_factor_fitted_from_the_one_shot_round(method):
    """The profile intervals and the ML refit of such a fit run rounds with the sites, which evaluate the
    shared levels as such: the session holds the set-up with them (it held the stand-ins', and the first
    follow-up round stopped with a KeyError).  Both equal the pooled fit's."""
    df, sites = _every_level_at_every_site()
    pooled = fedglmm.fit("y ~ x + (1 | g)", df)
    res = fedglmm.fit("y ~ x + (1 | g)", sites, method=method)
    assert res.rounds == 1
    assert np.allclose(profile_intervals(res).to_numpy(), profile_intervals(pooled).to_numpy(), rtol=1e-6)
    assert abs(res.refit_ml().loglik - pooled.refit_ml().loglik) < 1e-8


def test_one_shared_factor_with_a_withheld_cell_goes_to_the_rounds():
    """A cell below a site's minimum group size keeps its sums at the site: the per-level totals would miss
    it, so the Newton rounds fit the shared levels (the same pooled fit, in more rounds)."""
    df, sites = _every_level_at_every_site(n=300, levels=30)
    pooled = fedglmm.fit("y ~ x + (1 | g)", df)
    res = fedglmm.fit("y ~ x + (1 | g)", sites)
    assert res.rounds > 1
    assert abs(res.loglik - pooled.loglik) < 1e-8
    assert not any("one-shot round" in msg for msg in res.messages)


class _Recording(InProcessTransport):
    def broadcast(self, message):
        replies = super().broadcast(message)
        self.seen.append({s: _shapes(r) for s, r in replies.items()})
        return replies


def reply_shapes_doubled(df: pd.DataFrame, formula: str, **kw) -> list:
    """The shapes of every field of every site's replies to an iterative fit, {(site, field): shapes},
    for ``df`` split by its ``site`` column and for the same rows doubled."""
    seen = []
    for data in (df, pd.concat([df, df], ignore_index=True)):
        sites = {f"site{s}": Site(f"site{s}", d.reset_index(drop=True), min_group=1) for s, d in data.groupby("site")}
        tr = _Recording(sites)
        tr.seen = []
        fit_on(tr, formula, method="iterative", **kw)
        merged = {}
        for rnd in tr.seen:
            for sid, fields in rnd.items():
                for key, shapes in fields.items():
                    merged.setdefault((sid, key), set()).update(shapes)
        seen.append(merged)
    return seen


def _shapes(obj, prefix="", out=None) -> dict:
    """{field path: the set of shapes seen} (list items under their list's path)."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for key, val in obj.items():
            _shapes(val, f"{prefix}/{key}", out)
    elif isinstance(obj, (list, tuple)):
        for val in obj:
            _shapes(val, prefix + "[]", out)
    else:
        out.setdefault(prefix, set()).add(np.shape(obj))
    return out


def test_no_array_the_coordinator_receives_grows_with_the_rows():
    """The same fit with every row doubled: every field of every reply has the same shapes."""
    seen = reply_shapes_doubled(_simulated(seed=7, n=240), FORMULA)
    assert seen[0] == seen[1]
    assert any(key.endswith("sd2G") for _, key in seen[0])


def test_the_oneshot_method_refuses_shared_levels():
    df = _simulated()
    with pytest.raises(FedGLMMError, match="one-shot method needs each group at one site"):
        fedglmm.fit(FORMULA, df, site="site", method="oneshot", min_group=1)


def test_min_group_per_level_and_site_cell_under_rules():
    """A site with rules sends the sums of a shared level's small cell only masked: refused in the clear,
    fitted under secure aggregation, to the permissive fit."""
    df = _simulated(seed=11, n=240)
    rules = SiteConfig(min_rows=0, min_cell=0, min_group=12)
    with pytest.raises(SiteRefusal, match=r"group 'item' level '\w+' \(shared with other sites\) has \d+ "
                                          r"observation\(s\) here, fewer than min_group 12"):
        fedglmm.fit(FORMULA, df, site="site", method="iterative", site_config=rules)
    masked = fedglmm.fit(FORMULA, df, site="site", method="iterative", site_config=rules, secure_aggregation=True)
    plain = fedglmm.fit(FORMULA, df, site="site", method="iterative", min_group=1)
    assert abs(masked.loglik - plain.loglik) < 1e-8
    assert np.allclose(masked.fixef, plain.fixef, rtol=1e-7) and np.allclose(masked.theta, plain.theta, rtol=1e-6)


def test_profile_intervals_equal_the_pooled_ones():
    df = _simulated(seed=13, n=300)
    formula = "y ~ x + (1 | subject) + (1 | item)"
    res = fedglmm.fit(formula, df, site="site", min_group=1)
    pooled = fedglmm.fit(formula, df, method="iterative", min_group=1)
    assert np.allclose(res.conf_int(method="profile"), pooled.conf_int(method="profile"), atol=1e-6)
