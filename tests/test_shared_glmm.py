"""Levels shared by sites in binomial and poisson models (Laplace).

* a site's sums (:class:`fedglmm.likelihood.glmm_shared.SharedGLMMSums`): h*, its gradient and Hessian,
  log det H and its gradient, and the gradient of ⟨Γ, S_s⟩ against central differences;
* the coordinator's Laplace log-likelihood and its coupled gradient at the joint mode
  (:class:`fedglmm.likelihood.glmm_shared_pool.SharedGLMMPool`) against the pooled engine on all rows and
  against central differences of the log-likelihood with v solved at each φ; the exact ∂S along the
  difference directions makes the gradient exact whatever Γ̂ the sites were sent;
* held-out fits split by the reference's site column (``sim_doctors``: 11 of 85 doctors at two
  hospitals; ``sim_items_pois``: 12 items at 4-6 of 6 sites): the pooled fit to 1e-6 in logLik and 1e-6
  of an SE in the estimates, the modes of both factors, lme4's numbers under the parity criteria;
* what reaches the coordinator: no array grows with the rows; the min_group rule per (level, site) cell;
  refusals.
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
from test_shared import reply_shapes_doubled

import fedglmm
from fedglmm.coordinator.schema import merge_schema
from fedglmm.errors import FedGLMMError, SchemaError, SiteRefusal
from fedglmm.likelihood.glmm_shared import GLMM_SHARED_KEYS, SharedGLMMSums, to_global
from fedglmm.likelihood.glmm_shared_pool import SharedGLMMPool
from fedglmm.likelihood.multilevel import MultiLevelGLMM
from fedglmm.likelihood.setup import sum_replies
from fedglmm.likelihood.shared import SharedLayout
from fedglmm.model.design import build_design, describe_frame
from fedglmm.model.families import get_family
from fedglmm.model.formula import parse_formula
from fedglmm.site import SiteConfig

CASES = {c["name"]: c for c in cases("heldout")}
FORMULA = "y ~ x + (1 | subject) + (1 + x | item)"


def _simulated(family="binomial", seed=3, nsites=3, n=240):
    """Crossed design: subjects local to a site, items shared (some at every site, one at one site)."""
    rng = np.random.default_rng(seed)
    site = rng.integers(0, nsites, n)
    subject = site * 100 + rng.integers(0, 6, n)
    item = rng.integers(0, 6, n)
    item[site == 0] = np.where(rng.random(np.sum(site == 0)) < 0.2, 9, item[site == 0])   # item 9: site 0 only
    x = rng.normal(size=n)
    eta = -0.3 + 0.5 * x + 0.8 * rng.normal(size=1000)[subject] + 0.7 * rng.normal(size=10)[item] \
        + 0.3 * rng.normal(size=10)[item] * x
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
    return pd.DataFrame({"y": y, "x": x, "site": site, "subject": [f"s{k}" for k in subject],
                         "item": [f"i{k}" for k in item]})


def _engines(df, family, formula=FORMULA):
    spec, fam = parse_formula(formula), get_family(family)
    parts = {f"site{s}": d.reset_index(drop=True) for s, d in df.groupby("site")}
    schema = merge_schema({s: describe_frame(d, spec, s) for s, d in parts.items()}, spec, fam)
    pooled = build_design(spec, schema, df, fam, "all")
    layout = SharedLayout.from_payload({f: list(lv) for f, lv in schema.shared.items()},
                                       {f.name: f.q for f in pooled.groupings})
    zcols = {f.name: np.asarray(f.columns) for f in pooled.groupings}
    engines = {s: SharedGLMMSums(build_design(spec, schema, d, fam, s), fam, layout) for s, d in parts.items()}
    pool = SharedGLMMPool(layout, pooled.theta_mask, zcols, pooled.X.shape[1])
    return engines, pool, MultiLevelGLMM(pooled, fam)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_site_sums_against_central_differences(family):
    engines, pool, _ = _engines(_simulated(family), family)
    eng = engines["site0"]
    rng = np.random.default_rng(1)
    P = eng.Qs + eng.p + eng.k
    psi = np.r_[0.4 * rng.normal(size=eng.Qs + eng.p), 0.5 + 0.4 * rng.random(eng.k)]
    G = rng.normal(size=(eng.Qs, eng.Qs))
    G = G @ G.T / eng.Qs
    base = eng.pieces(psi, G)

    def at(x):
        eng.inner.u = [a.copy() for a in base["u"]]
        return eng.pieces(x, G)

    def sg(pc):
        return float(np.sum(G * -pc["Hh"][:eng.Qs, :eng.Qs]))           # ⟨Γ, S_s⟩

    h = 1e-5
    for j in range(P):
        e = np.zeros(P)
        e[j] = h
        up, dn = at(psi + e), at(psi - e)
        for fd, an in (((up["h"] - dn["h"]) / (2 * h), base["gh"][j]),
                       ((up["gh"] - dn["gh"]) / (2 * h), base["Hh"][:, j]),
                       ((up["l"] - dn["l"]) / (2 * h), base["gl"][j]),
                       ((sg(up) - sg(dn)) / (2 * h), base["gc"][j])):
            assert np.allclose(fd, an, rtol=1e-6, atol=1e-6)


def _at_mode(engines, pool, phi, iters=30):
    """The coordinator's profile at φ with v and Γ̂ iterated to the joint mode (no rounds: local engines)."""
    v, gamma = np.zeros(pool.Q), None
    for _ in range(iters):
        gamma = pool.gamma(phi, np.zeros((pool.Q, pool.Q))) if gamma is None else gamma
        tot = sum_replies({s: to_global(e.sums(pool.psi(phi, v), gamma=gamma), pool.Q) for s, e in engines.items()},
                          GLMM_SHARED_KEYS)
        pt = pool.assess(tot, phi, v)
        if pt.decrement < 1e-20 and np.max(np.abs(pt.Gamma - gamma)) < 1e-13:
            return pt, tot
        v, gamma = v + pt.dv, pt.Gamma
    return pt, tot


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_laplace_at_the_joint_mode_equals_the_pooled_one(family):
    """ℓ(φ) and its coupled gradient from the sites' sums equal the pooled engine's (all rows, every level
    its own random effect), and the gradient equals central differences of ℓ with v solved at each φ."""
    engines, pool, pooled = _engines(_simulated(family, seed=5), family)
    phi = np.r_[-0.2, 0.4, 0.7, 0.6, 0.2, 0.3]
    pt, _ = _at_mode(engines, pool, phi)
    value, grad, _ = pooled.value_grad(phi)
    assert abs(pt.value - value) < 1e-9 * abs(value)
    assert np.allclose(pt.grad, grad, rtol=1e-8, atol=1e-8)
    h = 1e-5
    for j in range(len(phi)):
        e = np.zeros(len(phi))
        e[j] = h
        fd = (_at_mode(engines, pool, phi + e)[0].value - _at_mode(engines, pool, phi - e)[0].value) / (2 * h)
        assert abs(fd - pt.grad[j]) < 1e-5 * (1 + abs(fd))


def test_exact_log_det_derivatives_need_no_exact_gamma():
    """With the totals S at x ± h(τ_j, e_j), the gradient at the mode is the pooled one even when the
    sites contracted ∂S with a Γ̂ off by half: only the part along τ − τ̄ uses Γ̂."""
    engines, pool, pooled = _engines(_simulated("binomial", seed=7), "binomial")
    phi = np.r_[-0.1, 0.5, 0.6, 0.5, 0.1, 0.3]
    pt, _ = _at_mode(engines, pool, phi)
    wrong = 0.5 * pt.Gamma

    def total(ph, v):
        return sum_replies({s: to_global(e.sums(pool.psi(ph, v), gamma=wrong), pool.Q) for s, e in engines.items()},
                           GLMM_SHARED_KEYS)

    h = 1e-4 * (1 + np.abs(phi))
    Sp, Sm = [], []
    for j in range(len(phi)):
        e = np.zeros(len(phi))
        e[j] = h[j]
        Sp.append(-total(phi + e, pt.v + h[j] * pt.tau[:, j])["Hh"][:pool.Q, :pool.Q])
        Sm.append(-total(phi - e, pt.v - h[j] * pt.tau[:, j])["Hh"][:pool.Q, :pool.Q])
    plain = pool.assess(total(phi, pt.v), phi, pt.v)
    exact = pool.assess(total(phi, pt.v), phi, pt.v, (Sp, Sm, h, pt.tau))
    grad = pooled.value_grad(phi)[1]
    assert np.max(np.abs(plain.grad - grad)) > 1e-3             # the wrong Γ̂ shows without the differences
    assert np.allclose(exact.grad, grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_gradient_away_from_vs_mode_moved_to_it(family):
    """At v off its mode by δv, the round's gradient (its log-determinant part moved to the mode from the
    difference points along (τ_j, e_j), :func:`~fedglmm.coordinator.shared_ends.log_det_to_mode`)
    is the gradient at the mode up to O(δv²); uncorrected it is off by O(δv)."""
    from fedglmm.coordinator.shared_ends import differences, log_det_to_mode

    engines, pool, pooled = _engines(_simulated(family, seed=5), family)
    phi = np.r_[-0.2, 0.4, 0.7, 0.6, 0.2, 0.3]
    mode, _ = _at_mode(engines, pool, phi)
    grad = pooled.value_grad(phi)[1]
    h = 1e-4 * (1 + np.abs(phi))
    errors = {}
    for size in (1e-3, 1e-4):
        v = mode.v + size * np.random.default_rng(2).normal(size=pool.Q)

        def at(ph, vv):          # the sites sent Γ at the point itself (a round sends its prediction)
            def total(gamma):
                return sum_replies({s: to_global(e.sums(pool.psi(ph, vv), gamma=gamma), pool.Q)
                                    for s, e in engines.items()}, GLMM_SHARED_KEYS)

            tot = total(pool.gamma(ph, -total(mode.Gamma)["Hh"][:pool.Q, :pool.Q]))
            return tot, pool.assess(tot, ph, vv)

        tot, plain = at(phi, v)
        Sp, Sm, others = [], [], []
        for j in range(len(phi)):
            e = np.zeros(len(phi))
            e[j] = h[j]
            for sign, S in ((1.0, Sp), (-1.0, Sm)):
                t, pt = at(phi + sign * e, v + sign * h[j] * plain.tau[:, j])
                S.append(-t["Hh"][:pool.Q, :pool.Q])
                others.append(pt)
        base = pool.assess(tot, phi, v, (Sp, Sm, h, plain.tau))
        moved = base.grad - 0.5 * log_det_to_mode(base, differences(others, h))
        errors[size] = (np.max(np.abs(base.grad - grad)), np.max(np.abs(moved - grad)))
    (plain3, moved3), (plain4, moved4) = errors[1e-3], errors[1e-4]
    assert plain3 > 3 * moved3 and plain4 > 30 * moved4
    assert 5 < plain3 / plain4 < 20             # O(δv)
    assert moved3 / moved4 > 30                 # O(δv²)


class _LocalRounds:
    """The sites' shared sums in this process, counting rounds (the coordinator's rounds without a wire)."""

    def __init__(self, engines):
        self.engines, self.count = engines, 0

    def _replies(self, points, gammas):
        self.count += 1
        return {s: {"points": [e.sums(x, gamma=g) for x, g in zip(points, gammas)]} for s, e in self.engines.items()}

    def evaluate(self, points, keys, extra):
        reps = self._replies(points, extra["gammas"])
        return [sum_replies({s: to_global(r["points"][i], self.Q) for s, r in reps.items()}, keys)
                for i in range(len(points))]

    def finalize(self, point, keys, extra):
        return None, self._replies(extra["points"], extra["gammas"])


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_a_final_round_at_a_settled_point_is_one_round(family):
    """Where v is at its mode, the final round ends: the line points the round also carries (v moved by
    fractions of a step of ~0) differ from it by rounding only, and used to win ties, repeating the round
    up to MAX_WARM times."""
    from fedglmm.coordinator.shared_glmm_rounds import MAX_WARM, SharedGLMMEvaluator

    engines, pool, _ = _engines(_simulated(family, seed=5), family)
    ev = SharedGLMMEvaluator.__new__(SharedGLMMEvaluator)
    ev.rounds, ev.settle, ev.patient = _LocalRounds(engines), 0.5, False
    ev.layout, ev.pool, ev.seen = pool.layout, pool, []
    ev.rounds.Q = pool.Q
    ev._shared_modes = lambda pt, D: {}
    rng = np.random.default_rng(0)
    for phi in np.r_[-0.2, 0.4, 0.7, 0.6, 0.2, 0.3] + 0.05 * rng.normal(size=(6, 6)):
        ev.evaluate([phi], None)
        ev.finalize(phi, None)              # v to its mode (a decrement below FINAL_DEC)
        for _ in range(3):
            before = ev.rounds.count
            s, _ = ev.finalize(phi, None)
            assert np.isfinite(s["value"])
            assert ev.rounds.count - before == 1 < MAX_WARM


@pytest.mark.parametrize("name", ["sim_doctors_la", "sim_items_pois"])
def test_split_by_site_gives_the_pooled_fit_and_lme4s(name):
    case = CASES[name]
    pooled = fit(case, method="iterative", min_group=1)
    res = fit(case, data=split_sites(case), min_group=1)
    assert res.rounds <= 10
    assert abs(res.loglik - pooled.loglik) < 1e-6
    assert np.all(np.abs(res.fixef - pooled.fixef) / pooled.se < 1e-6)
    assert np.allclose(res.theta, pooled.theta, rtol=1e-6, atol=1e-8)
    # standard errors: each fit's from differences of gradients at its own last point, moved to the
    # estimate by a secant; they agree to a few 1e-5 (lme4's parity criterion: 5 %)
    assert np.allclose(res.se, pooled.se, rtol=1e-4)
    (m, sd), (pm, psd) = res.ranef(condvar=True, by_factor=True), pooled.ranef(condvar=True, by_factor=True)
    for f in pm:
        assert set(m[f].index) == set(pm[f].index)
        assert np.allclose(m[f].loc[pm[f].index], pm[f], atol=1e-5)
        assert np.allclose(sd[f].loc[pm[f].index], psd[f], rtol=1e-4)
    assert compare(res, case) == []
    assert "shared" in res.summary()


def test_trial_points_settle_loosely_only_far_from_the_estimate():
    """sim_items_pois_slope over its 6 sites took 12 rounds with every trial point's v settled to a decrement of
    0.5 (a long step's point a round more), 10 with 2 while the iteration is far (its decrement above 3); over 3
    sites 8 either way, where 2 throughout took 10 (a point 0.009 above the optimum taken with its value 1.8e-3
    too high, and every step from it failed)."""
    case = CASES["sim_items_pois_slope"]
    pooled = fit(case, method="iterative", min_group=1)
    for k, most in ((None, 10), (3, 8)):
        res = fit(case, data=split_sites(case, k), min_group=1)
        assert res.rounds <= most
        assert abs(res.loglik - pooled.loglik) < 1e-8
        assert np.all(np.abs(res.fixef - pooled.fixef) / pooled.se < 1e-6)


def test_no_array_the_coordinator_receives_grows_with_the_rows():
    """The same binomial fit with every row doubled: every field of every reply has the same shapes."""
    seen = reply_shapes_doubled(_simulated(seed=9, n=200), "y ~ x + (1 | subject) + (1 | item)", family="binomial")
    assert seen[0] == seen[1]
    assert any(key.endswith("Hh") for _, key in seen[0])


def test_min_group_per_level_and_site_cell_and_refusals():
    """A site with rules sends a small shared cell's sums only masked (refused in the clear, fitted under
    secure aggregation to the plain fit); other families, quadrature and the expected curvature of a
    non-canonical link refuse shared levels."""
    df = _simulated(seed=11, n=240)
    formula = "y ~ x + (1 | subject) + (1 | item)"
    rules = SiteConfig(min_rows=0, min_cell=0, min_group=12)
    with pytest.raises(SiteRefusal, match=r"group 'item' level '\w+' \(shared with other sites\) has \d+ "
                                          r"observation\(s\) here, fewer than min_group 12"):
        fedglmm.fit(formula, df, family="binomial", site="site", method="iterative", site_config=rules)
    masked = fedglmm.fit(formula, df, family="binomial", site="site", method="iterative", site_config=rules,
                         secure_aggregation=True)
    plain = fedglmm.fit(formula, df, family="binomial", site="site", method="iterative", min_group=1)
    assert abs(masked.loglik - plain.loglik) < 1e-8
    assert np.allclose(masked.fixef, plain.fixef, rtol=1e-7) and np.allclose(masked.theta, plain.theta, rtol=1e-6)
    with pytest.raises(SchemaError, match="levels shared by sites are fitted for gaussian, binomial and poisson"):
        fedglmm.fit(formula, df.assign(y=df["y"] + 1), family="negative_binomial", site="site", min_group=1)
    with pytest.raises(FedGLMMError, match="nagq > 1"):
        fedglmm.fit("y ~ x + (1 | item)", df, family="binomial", site="site", nagq=3, min_group=1)
    with pytest.raises(FedGLMMError, match="curvature='expected' is not available"):
        fedglmm.fit(formula, df, family="binomial", link="probit", curvature="expected", site="site", min_group=1)



def test_a_value_known_to_first_order_is_taken_again_when_every_step_fails():
    """A poisson model without intercept over 3 sites, all 30 levels at every site: the random effects carry
    the mean, and a round's accepted point had a v 7e-3 in decrement from its mode, where ℓ came out 2.6e-4
    too high.  No step could beat that value: eleven rounds rejected, then "converged" 1.8e-6 below the
    optimum.  Now a round whose steps all fail also evaluates the current point again (v moved to its
    mode), and the fit is the pooled one."""
    rng = np.random.default_rng(1)
    n, G = 600, 30
    g = rng.integers(0, G, n)
    x = rng.normal(size=n)
    b = rng.normal(0, 0.8, G)
    rng.random(n)                                     # (the draws of the data this was found on)
    site = rng.integers(0, 3, n)
    rng.choice(3, n)
    df = pd.DataFrame({"cnt": rng.poisson(np.exp(0.5 + 0.3 * x + b[g])), "x": x, "g": [f"h{k}" for k in g]})
    sites = {f"s{k}": df[site == k].reset_index(drop=True) for k in range(3)}
    pooled = fedglmm.fit("cnt ~ 0 + x + (1 | g)", df, family="poisson")
    for method in ("hybrid", "iterative"):
        res = fedglmm.fit("cnt ~ 0 + x + (1 | g)", sites, family="poisson", method=method)
        assert any("levels shared by sites" in m for m in res.messages)
        assert abs(res.loglik - pooled.loglik) < 1e-8
        assert np.allclose(np.asarray(res.fixef), np.asarray(pooled.fixef), rtol=0, atol=1e-8)
        assert np.allclose(np.asarray(res.theta), np.asarray(pooled.theta), rtol=0, atol=1e-7)


def _far_modes():
    """Levels whose means reach e^5.7 in a poisson model without intercept (8 levels, 1500 rows), every level at
    both of 2 sites: the data pooled and split."""
    rng = np.random.default_rng(3)
    for _ in range(3):                      # (the draws of the simulation that found it: rows, levels, sites)
        rng.choice(3)
    g = rng.integers(0, 8, 1500)
    x = rng.normal(size=1500)
    rng.choice(3)
    b = rng.normal(0, 1.5, 8)
    rng.choice(3)
    rng.choice(2)
    df = pd.DataFrame({"y": rng.poisson(np.exp(1.0 + 0.5 * x + b[g])), "x": x, "g": [f"h{k}" for k in g]})
    site = rng.integers(0, 2, 1500)
    return df, {f"s{k}": df[site == k].reset_index(drop=True) for k in range(2)}


def test_a_start_far_from_the_shared_modes_is_warmed_up_to_the_end():
    """From the site totals' start (the iterative method's: slope 2.7 for 0.5, SD 4.8) v took 10 rounds to
    settle, and after 8 the fit stopped ("the objective is not finite at the starting values").  The start
    now warms up to MAX_START rounds, and the fit is the pooled one."""
    df, sites = _far_modes()
    pooled = fedglmm.fit("y ~ 0 + x + (1 | g)", df, family="poisson")
    res = fedglmm.fit("y ~ 0 + x + (1 | g)", sites, family="poisson", method="iterative")
    assert any("levels shared by sites" in m for m in res.messages)
    assert abs(res.loglik - pooled.loglik) < 1e-8
    assert np.allclose(np.asarray(res.fixef), np.asarray(pooled.fixef), rtol=0, atol=1e-8)


def test_the_sites_own_fits_of_one_shared_factor_start_the_hybrid():
    """The sites' fits of their rows (one factor, 94 rows a level) start the default method: slope 0.496, SD
    2.29 (the pooled fit's 0.504 and 2.29), not the site totals' 2.7 and 4.8 (34 rounds before, 10 now)."""
    df, sites = _far_modes()
    pooled = fedglmm.fit("y ~ 0 + x + (1 | g)", df, family="poisson")
    res = fedglmm.fit("y ~ 0 + x + (1 | g)", sites, family="poisson")
    assert abs(res.loglik - pooled.loglik) < 1e-8
    assert np.allclose(np.asarray(res.fixef), np.asarray(pooled.fixef), rtol=0, atol=1e-8)
    assert res.rounds <= 12


def _warm_up_rounds(df, family, formula, phi):
    """Rounds the coordinator takes, from v = 0, to settle the shared effects at ``phi`` (local sites)."""
    from fedglmm.coordinator.shared_glmm_rounds import SharedGLMMEvaluator

    engines, pool, _ = _engines(df, family, formula)
    ev = SharedGLMMEvaluator.__new__(SharedGLMMEvaluator)
    ev.rounds, ev.settle, ev.patient = _LocalRounds(engines), 0.5, False
    ev.layout, ev.pool, ev.seen = pool.layout, pool, []
    ev.rounds.Q = pool.Q
    out = ev.evaluate([np.asarray(phi, float)], None)[0]
    assert np.isfinite(out["value"]) and ev.seen[-1].decrement < 0.5
    return ev.rounds.count


def test_the_shared_modes_are_reached_level_by_level_from_a_grid():
    """A first round also tries every level's intercept at -4 .. 4, and each level goes on from its own best
    point by its own capped Newton step (one factor: F is a sum over the levels).  From v = 0 by capped
    steps of all levels together, v reached its modes at the start in 6 rounds (levels' means up to e^5.7,
    ``_far_modes``; and an SD of 1.5 with a random slope, 30 levels over 3 sites); now in 4."""
    df, _ = _far_modes()
    df["site"] = np.random.default_rng(3).integers(0, 2, len(df))
    assert _warm_up_rounds(df, "poisson", "y ~ 0 + x + (1 | g)", [0.496, 2.291]) <= 4
    rng = np.random.default_rng(0)
    g, x = rng.integers(0, 30, 900), rng.normal(size=900)
    eta = 0.2 + 0.5 * x + rng.normal(0, 1.5, 30)[g] + rng.normal(0, 0.5, 30)[g] * x
    df = pd.DataFrame({"y": rng.poisson(np.exp(eta)), "x": x, "g": [f"h{k}" for k in g],
                       "site": rng.integers(0, 3, 900)})
    assert _warm_up_rounds(df, "poisson", "y ~ x + (1 + x | g)", [0.2, 0.5, 1.5, 0.0, 0.5]) <= 4


def test_shared_levels_moments_add_up_to_the_pooled_data_s(monkeypatch):
    """A GLMM's one-shot moment sums of each shared level, added up over its sites
    (:func:`~fedglmm.coordinator.shared_blocks.merge_shared_levels` with ``moments``), are those of the
    level's rows pooled; the pseudo-data fit of them starts the hybrid beside the sites' own fits
    (``_far_modes``: 10 rounds at b56ec72, 8 with the first round's grid of v, 7 with this start)."""
    from fedglmm.coordinator.shared_blocks import merge_shared_levels
    from fedglmm.methods import hybrid

    seen = []
    real = hybrid.merge_messages
    monkeypatch.setattr(hybrid, "merge_messages", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    df, sites = _far_modes()
    res = fedglmm.fit("y ~ 0 + x + (1 | g)", sites, family="poisson")
    assert res.rounds <= 7
    by_level = merge_shared_levels(seen[-1], moments=True)
    fedglmm.fit("y ~ 0 + x + (1 | g)", {"all": df}, family="poisson")
    pooled = seen[-1].blocks["all"]
    kept = [b for b in by_level.blocks.values() if b is not None]
    assert len(kept) == 1 < len(by_level.blocks)          # every level's total at the first site naming it
    got = {lv: (n, m) for b in kept for lv, n, m in zip(b["levels"], b["n"], b["moments"])}
    assert sorted(got) == sorted(map(str, pooled["levels"])) and len(got) == 8
    for lv, n, m in zip(pooled["levels"], pooled["n"], pooled["moments"]):
        assert got[str(lv)][0] == n
        assert np.allclose(got[str(lv)][1], m, rtol=1e-12, atol=1e-9)
    assert merge_shared_levels(seen[-2]) is None                 # a GLMM's, only where asked for


def test_levels_step_alone_only_where_no_factor_crosses_them():
    """The levels' own steps and the first round's grid need F to be a sum over the shared levels: with
    items crossed by subjects (local to sites) C couples the items, and v moves as a whole; with the items
    the only factor C is block-diagonal by item."""
    from fedglmm.coordinator.shared_glmm_rounds import SharedGLMMEvaluator

    for formula, separate in ((FORMULA, False), ("y ~ x + (1 + x | item)", True)):
        engines, pool, _ = _engines(_simulated("poisson", seed=5), "poisson", formula)
        ev = SharedGLMMEvaluator.__new__(SharedGLMMEvaluator)
        ev.rounds, ev.settle, ev.patient = _LocalRounds(engines), 0.5, False
        ev.layout, ev.pool, ev.seen = pool.layout, pool, []
        ev.rounds.Q = pool.Q
        phi = np.r_[-0.3, 0.5, 0.7, 0.1, 0.3] if separate else np.r_[-0.3, 0.5, 0.8, 0.7, 0.1, 0.3]
        grid = ev._grid(phi)
        ev.evaluate([phi], None)
        pt = ev.seen[-1]
        assert (ev._blocks(pt) is not None) == separate and (len(grid) == 6) == separate
        if separate:        # each level by its own step, none capped at a settled point: the whole Newton step
            assert np.abs(pool.L(phi[pool.p:]) @ pt.dv).max() < 2.0
            assert np.allclose(ev._step(pt)[0], pt.v + pt.dv, rtol=0, atol=1e-12)


def test_no_pseudo_data_fit_where_a_site_withheld_shared_cells(monkeypatch):
    """Levels shared by sites, a site's small cells withheld (their moments not merged by level): the start
    is the sites' own fits, so no pseudo-data fit is made (it was, and the note said the rounds started
    from it), and the fit is the iterative one."""
    from fedglmm.methods import hybrid

    rng = np.random.default_rng(3)
    g, x = rng.integers(0, 30, 3000), rng.normal(size=3000)
    df = pd.DataFrame({"y": rng.poisson(np.exp(0.3 + 0.4 * x + rng.normal(0, 0.6, 30)[g])), "x": x, "g": g,
                       "site": rng.choice(3, 3000, p=[0.6, 0.3, 0.1])})
    made = []
    real = hybrid._pseudo_fit
    monkeypatch.setattr(hybrid, "_pseudo_fit", lambda *a, **k: made.append(1) or real(*a, **k))
    res = fedglmm.fit("y ~ x + (1 | g)", df, family="poisson", site="site")
    it = fedglmm.fit("y ~ x + (1 | g)", df, family="poisson", site="site", method="iterative")
    note = next(m for m in res.messages if m.startswith("summaries of small groups stayed"))
    assert not made and note.endswith("started from the sites' own fits"), note
    assert abs(res.loglik - it.loglik) < 1e-8 and np.allclose(res.fixef, it.fixef, rtol=0, atol=1e-7)
