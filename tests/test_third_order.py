"""The third-order steps of gaussian models with several grouping factors (fedglmm.likelihood.third_order):
the sums' third derivatives, the profiled criterion's, the cubic model's step, and the rounds they save."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from multilevel_reference import cases, fit, split_sites  # noqa: E402

from fedglmm.coordinator.schema import merge_schema  # noqa: E402
from fedglmm.likelihood.lmm import profiled_deviance  # noqa: E402
from fedglmm.likelihood.lmm_sparse import MultiLMMSums  # noqa: E402
from fedglmm.likelihood.third_order import cubic_step, profiled_third  # noqa: E402
from fedglmm.model.design import build_design, describe_frame  # noqa: E402
from fedglmm.model.families import get_family  # noqa: E402
from fedglmm.model.formula import parse_formula  # noqa: E402

HELDOUT = Path(__file__).parent / "data" / "heldout" / "multilevel"
CASES = {c["name"]: c for c in cases()}


# grouseticks with two nested factors: its estimate (LOCATION's SD at zero) and a point off it
GROUSE_POINTS = (np.array([46.86486, -0.4821753, -0.0256123, 1.2490802, 0.0]), np.array([46.0, -0.47, -0.03, 1.1, 0.3]))


def _grouse_multilevel():
    """The multi-level GLMM engine of grouseticks (every row) with BROOD and LOCATION as grouping factors."""
    from fedglmm.likelihood.multilevel import MultiLevelGLMM

    df = pd.read_csv(Path(__file__).parent / "data" / "grouseticks.csv")
    spec, fam = parse_formula("TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | LOCATION)"), get_family("poisson")
    schema = merge_schema({"s": describe_frame(df, spec, "s")}, spec, fam)
    return MultiLevelGLMM(build_design(spec, schema, df, fam, "s"), fam)


def _central_third(eng, x: np.ndarray) -> np.ndarray:
    """ℓ's third derivatives at x by central differences of the engine's central Hessians 1e-4 (1 + |x_t|) apart."""
    P = len(x)
    want = np.empty((P, P, P))
    for t in range(P):
        h = 1e-4 * (1 + abs(x[t]))
        e = np.eye(P)[t] * h
        want[:, :, t] = (eng.evaluate(x + e, central=True).hess - eng.evaluate(x - e, central=True).hess) / (2 * h)
    return want


def _engine(formula: str, rows: int = 600) -> MultiLMMSums:
    df = pd.read_csv(HELDOUT / "sim_gauss3.csv").iloc[:rows]
    spec, fam = parse_formula(formula), get_family("gaussian")
    schema = merge_schema({"s": describe_frame(df, spec, "s")}, spec, fam)
    return MultiLMMSums(build_design(spec, schema, df, fam, "s"))


def test_sums_third_derivatives_against_differences():
    """d3A, d3b, d3c, d3d against central differences of the second derivatives, evaluated afresh with a
    step ten times longer: the entries with at most two distinct indices (from the central points) and
    those with three (from two more points per pair).  (Second differences at the Hessian's step, 1e-5,
    carry rounding of about 1e-5 of the largest entry: a correction term needs no more.)"""
    eng = _engine("y ~ time + (1 + time | patient) + (1 | hospital)")
    k = eng.ntheta
    assert k == 4
    theta = np.array([0.8, 0.1, 0.4, 0.6])
    s = eng.evaluate(theta, order=3)
    for t in range(k):
        h = 1e-4 * (1 + abs(theta[t]))
        e = np.eye(k)[t] * h
        up, dn = eng.evaluate(theta + e, order=2), eng.evaluate(theta - e, order=2)
        for key in ("A", "b", "c", "d"):
            want = (np.asarray(up["d2" + key]) - np.asarray(dn["d2" + key])) / (2 * h)     # ∂_t of d2[u, v]
            got = np.asarray(s["d3" + key])
            scale = max(1.0, float(np.max(np.abs(want))))
            for u in range(k):
                for v in range(k):
                    assert np.allclose(got[u, v, t], want[u, v], rtol=1e-3, atol=1e-4 * scale), (key, u, v, t)


def test_profiled_third_against_differences():
    """The profiled REML criterion's third derivatives from the sums (two θ: no entry is missing), against
    central differences of its Hessian from fresh sums."""
    eng = _engine("y ~ time + (1 | patient) + (1 | hospital)")
    theta = np.array([0.7, 0.5])
    T = profiled_third(eng.evaluate(theta, order=3), theta, True)
    for t in range(2):
        h = 1e-4 * (1 + abs(theta[t]))
        e = np.eye(2)[t] * h
        want = 0.25 * (profiled_deviance(eng.evaluate(theta + e, order=2), True).hess
                       - profiled_deviance(eng.evaluate(theta - e, order=2), True).hess) / h
        assert np.allclose(T[:, :, t], want, rtol=1e-3, atol=1e-4 * np.max(np.abs(want)))


def test_cubic_step_solves_the_cubic_model():
    """The step is a minimum of gᵀs + ½sᵀHs + ⅙T[s,s,s]: its gradient vanishes and its Hessian is positive
    definite; with T = 0 it is Newton's; far beyond the Newton step's reach there is none."""
    rng = np.random.default_rng(2)
    B = rng.normal(size=(3, 3))
    H, g = B @ B.T + 3 * np.eye(3), rng.normal(size=3)
    T = rng.normal(scale=0.3, size=(3, 3, 3))
    T = sum(T.transpose(p) for p in [(0, 1, 2), (1, 2, 0), (2, 0, 1), (1, 0, 2), (0, 2, 1), (2, 1, 0)]) / 6
    s, pred = cubic_step(g, H, T)
    assert np.allclose(g + H @ s + 0.5 * np.einsum("abc,b,c->a", T, s, s), 0, atol=1e-12)
    np.linalg.cholesky(H + np.einsum("abc,c->ab", T, s))
    assert pred == pytest.approx(-(g @ s + 0.5 * s @ H @ s + np.einsum("abc,a,b,c->", T, s, s, s) / 6))
    assert np.allclose(cubic_step(g, H, 0 * T)[0], -np.linalg.solve(H, g))
    assert cubic_step(g, H, 50 * T) is None


@pytest.mark.parametrize("name", ["pastes_nested_reml", "pastes_inter_ml", "oats_splitplot_reml",
                                  "sim_gauss3_hslope_reml", "scotssec_ml"])
def test_gaussian_splits_in_four_rounds(name):
    """Over 3 sites these took 5 rounds with Newton's steps; with the cubic model's, 4 -- and the estimate is
    the pooled one (estimates, SDs, logLik to 1e-8 relative).  scotssec by ML took 4 with Newton's and 5
    with the cubic model's alone (from a decrement of 1.2 its step left 1.8e-2, Newton's 2.4e-3): from a
    decrement above 1 both go in the round (newton_beside), 4 again."""
    case = CASES[name]
    split, pooled = fit(case, data=split_sites(case, 3)), fit(case)
    assert split.rounds <= 4
    assert np.allclose(split.fixef, pooled.fixef, rtol=1e-8, atol=1e-8)
    assert np.allclose([r.get("sd", r.get("corr")) for r in split.random],
                       [r.get("sd", r.get("corr")) for r in pooled.random], rtol=1e-8, atol=1e-8)
    assert split.loglik == pytest.approx(pooled.loglik, rel=1e-10)


def test_gaussian_fit_without_the_factor_a_site_holds_one_level_of():
    """A gaussian site that holds one hospital fits its rows without the hospital's term and sends β̂'s
    information (β profiled) and σ̂ with it; the coordinator's start takes the hospital variance between
    sites (DerSimonian-Laird on the intercepts, the BCG trials' as in test_starts: τ̂² = 0.308760262862)
    relative to the fits' mean σ̂², and the patients' covariance from the fits; not where levels are shared."""
    from types import SimpleNamespace as NS

    from fedglmm.coordinator.own_combination import factor_combined_start, factor_fits
    from fedglmm.likelihood.setup import Setup
    from test_starts import BCG_V, BCG_Y

    st = NS(names=["Intercept"], ndisp=0, A=np.eye(1), mask=np.eye(2, dtype=bool), theta_scale=np.ones(2),
            znames=["Intercept", "Intercept"], shared={}, factor_columns=lambda: {"patient": [0], "hospital": [1]})
    st.internal_transform = lambda: Setup.internal_transform(st)
    fits = {f"s{k}": {"alone": ["hospital"], "names": ["Intercept"], "z_names": ["Intercept", "Intercept"],
                      "beta": [y], "theta": [0.6, 0.0], "info": np.array([[1.0 / v]]), "sigma": 2.0, "n": 100.0,
                      "levels": {"patient": 30, "hospital": 1}} for k, (y, v) in enumerate(zip(BCG_Y, BCG_V))}
    assert factor_fits(st, fits) == fits
    theta, _ = factor_combined_start(st, list(fits.values()), np.array([1.0, 1.0]))
    assert theta[0] == pytest.approx(0.6, rel=1e-6) and theta[1] ** 2 == pytest.approx(0.308760262862 / 4.0, rel=1e-6)
    plain, _ = factor_combined_start(st, list(fits.values()), np.array([1.0, 1.0]), False)
    assert plain[1] == pytest.approx(1.0, rel=1e-6)                 # the site totals' hospital SD instead
    st.shared = {"patient": {"p1": 2}}
    assert factor_fits(st, fits) == {}


@pytest.mark.parametrize("name", ["sim_gauss3_reml", "sim_gauss_singular_ml"])
def test_one_hospital_per_site_in_four_rounds(name):
    """Split one hospital per site (15 and 12 sites), these took 6 and 5 rounds (5 and 5 with the cubic
    model alone; the start from the site totals); with the sites' fits without the hospital factor, 4 --
    and the estimate is the pooled one."""
    case = CASES[name]
    split, pooled = fit(case, data=split_sites(case)), fit(case)
    assert split.rounds <= 4
    assert np.allclose([r.get("sd", r.get("corr")) for r in split.random],
                       [r.get("sd", r.get("corr")) for r in pooled.random], rtol=1e-8, atol=1e-8)
    assert split.loglik == pytest.approx(pooled.loglik, rel=1e-10)


def test_shared_levels_third_derivatives_and_rounds(monkeypatch):
    """Levels shared by sites (scotssec: primary schools at several secondary schools' sites, 3 sites): the
    pooled criterion's third derivatives from the sites' summed sums (their third derivatives carried
    through the coordinator's integration over the shared effects) against central differences of its
    Hessian from fresh rounds at θ ± h e_t; and sim_teachers (teachers shared by schools) over 3 sites in 3
    rounds (4 with Newton's steps), equal to the pooled fit."""
    from fedglmm.coordinator import shared_rounds as SR

    seen = []
    original = SR.SharedRoundEvaluator.evaluate

    def spy(self, points, keys):
        res = original(self, points, keys)
        if not seen and "d3A" in keys:
            x = np.asarray(points[0], float)
            exact = np.zeros((len(x),) * 3)
            for t in range(len(x)):
                h = 1e-4 * (1 + abs(x[t]))
                up, dn = original(self, [x + np.eye(len(x))[t] * h, x - np.eye(len(x))[t] * h], keys)
                exact[:, :, t] = 0.25 * (profiled_deviance(up, False).hess - profiled_deviance(dn, False).hess) / h
            seen.append((profiled_third(res[0], x, False), exact))
        return res

    monkeypatch.setattr(SR.SharedRoundEvaluator, "evaluate", spy)
    case = CASES["scotssec_ml"]
    fit(case, data=split_sites(case, 3))
    got, exact = seen[0]
    exact = (exact + exact.transpose(1, 2, 0) + exact.transpose(2, 0, 1)) / 3
    assert np.allclose(got, exact, rtol=1e-3, atol=1e-4 * np.max(np.abs(exact)))
    monkeypatch.undo()
    case = CASES["sim_teachers_reml"]
    split, pooled = fit(case, data=split_sites(case, 3)), fit(case)
    assert split.rounds <= 3
    assert np.allclose([r.get("sd", r.get("corr")) for r in split.random],
                       [r.get("sd", r.get("corr")) for r in pooled.random], rtol=1e-8, atol=1e-8)
    assert split.loglik == pytest.approx(pooled.loglik, rel=1e-10)


def test_a_sites_third_derivatives_at_a_final_point():
    """reply_third (a finalize request with ``third``) differences the engine's Hessian: exact for a cubic
    log-likelihood ℓ = T[x, x, x]/6 (Hessian T·x), whatever the point; nothing without the request.  Under secure
    aggregation the same (masked with the other sums), and NaNs where the site could not make them: every site's
    reply then has the same fields, as masked replies must to add up."""
    from fedglmm.likelihood.linalg import pack_third, symmetric_third, unpack_third
    from fedglmm.site.own_third import reply_third

    T = symmetric_third(np.random.default_rng(3).standard_normal((4, 4, 4)))
    assert np.allclose(unpack_third(pack_third(T), 4), T, rtol=0, atol=1e-14) and unpack_third(np.zeros(21), 4) is None

    class Engine:
        def sums(self, x):
            return {"hess": T @ np.asarray(x, float)}

    for x in (np.zeros(4), np.array([0.3, -2.0, 150.0, 1e-3])):
        reply = {"hess": T @ x}
        reply_third(Engine(), x, {"third": True}, reply)
        assert reply["third"].shape == (20,) and np.allclose(unpack_third(reply["third"], 4), T, rtol=0, atol=1e-8)
        quiet = {"hess": T @ x}
        reply_third(Engine(), x, {}, quiet)
        assert "third" not in quiet
        masked = {"hess": T @ x}
        reply_third(Engine(), x, {"third": True, "secagg": {"round": 1}}, masked)
        assert np.array_equal(masked["third"], reply["third"])

    class Broken(Engine):
        def sums(self, x):
            return {"hess": np.full((4, 4), np.nan)}

    for req, sent in (({"third": True}, None), ({"third": True, "secagg": {"round": 1}}, 20)):
        reply = {"hess": np.full((4, 4), np.nan)}
        reply_third(Broken(), np.ones(4), req, reply)
        assert (reply.get("third") is None) if sent is None else \
            reply["third"].shape == (sent,) and np.all(np.isnan(reply["third"]))


def test_a_quadrature_sites_third_derivatives_from_its_gradients():
    """By adaptive Gauss-Hermite the engine's Hessian is a central difference of its analytic gradients: the third
    derivatives (reply_third), at a final point and at a round's, come from the Hessian's own gradients and
    P(P - 1)/2 more (a seven-point stencil took P(P + 1), P forward differences of the Hessian 2P²).  On cbpp (nAGQ
    10, a binomial with four fixed effects) at lme4's estimate and off it they agree with central differences of
    the engine's Hessian 1e-3 apart to 2e-5 of their largest entry (P forward differences of the Hessian 1e-4
    apart: 1.4e-4 of it here, 2e-4 to 4e-4 on held-out fits)."""
    from fedglmm.likelihood.laplace import GLMMLikelihood
    from fedglmm.likelihood.linalg import unpack_third
    from fedglmm.site.own_third import reply_third

    df = pd.read_csv(Path(__file__).parent / "data" / "cbpp.csv", dtype={"period": str})
    spec, fam = parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)"), get_family("binomial")
    schema = merge_schema({"s": describe_frame(df, spec, "s")}, spec, fam)
    eng = GLMMLikelihood(build_design(spec, schema, df, fam, "s"), fam, 10)
    calls, grad = [], eng.value_grad

    def counted(*args, **kw):
        calls.append(1)
        return grad(*args, **kw)

    eng.value_grad = counted
    for x in (np.array([-1.3989, -0.9919, -1.1282, -1.5797, 0.6416]), np.array([-1.2, -1.1, -1.0, -1.7, 0.9])):
        want = np.empty((5, 5, 5))
        for t in range(5):
            e = np.eye(5)[t] * 1e-3 * max(1.0, abs(x[t]))
            want[:, :, t] = (eng.sums(x + e)["hess"] - eng.sums(x - e)["hess"]) / (2 * e[t])
        for index in (0, None):
            req, reply = {"third_at": [0]} if index == 0 else {"third": True}, dict(eng.sums(x))
            calls.clear()
            got = unpack_third(reply_third(eng, x, req, reply, index)["third"], 5)
            assert np.max(np.abs(got - want)) < 2e-5 * np.max(np.abs(want)), (index, np.max(np.abs(got - want)))
            assert len(calls) == 10


def test_a_multilevel_sites_third_derivatives_at_a_rounds_points():
    """An ``evaluate`` request with ``third_at`` gets those points' third derivatives (reply_third, from their
    warm modes; nothing at the other points).  The multi-level GLMM engine's Hessian is a difference of its
    analytic gradients; differenced again, with every moved mode polished (third_hessian), along the
    covariance parameters alone (the entries with an index among them; the others 0), at grouseticks'
    estimate (two nested factors, LOCATION's SD at zero, where the coordinator restores F's symmetry:
    even_third) and off it, they agree with central differences of central Hessians to 2e-3 of their largest
    entry (forward differences 1e-4 apart)."""
    from fedglmm.likelihood.linalg import unpack_third
    from fedglmm.likelihood.steps import even_third
    from fedglmm.site.own_third import reply_third

    eng = _grouse_multilevel()
    P = eng.p + eng.ntheta
    theta = np.zeros((P, P, P), bool)
    for t in range(eng.p, P):
        theta[t], theta[:, t], theta[:, :, t] = True, True, True
    for x in GROUSE_POINTS:
        assert "third" not in reply_third(eng, x, {"third_at": [1]}, dict(eng.sums(x)), 0)
        reply = reply_third(eng, x, {"third_at": [0]}, dict(eng.sums(x)), 0)
        got = even_third(x, unpack_third(reply["third"], P), [4])      # (of ℓ)
        want = _central_third(eng, x)
        assert np.max(np.abs(got - want)[theta]) < 2e-3 * np.max(np.abs(want)), np.max(np.abs(got - want)[theta])
        assert np.all(got[~theta] == 0.0) and np.any(want[~theta] != 0.0)


def test_a_final_points_third_derivatives_where_the_rows_are_few():
    """A final point asks for the sites' third derivatives wherever its decrement is predicted above 1e-15 (for
    standard errors to 1e-8), but on more than THIRD_ROWS rows -- where P Hessians are P passes over the rows --
    only above tol/10, as before; by quadrature alike; with several grouping factors (on up to 24 parameters, as
    with one: by the gradients of the final point's Hessian, P(P - 1)/2 more) at every final point on up to
    THIRD_ROWS rows (cbpp_olre's iterative fit ended 1.2e-11 above the optimum where 1e-17 was predicted), above
    tol/10 beyond."""
    from types import SimpleNamespace

    from fedglmm.likelihood.fit import THIRD_ROWS, _newton_config
    from fedglmm.model.options import FitOptions

    for nagq in (1, 10):
        opts = FitOptions(nagq=nagq)
        for n, want in ((THIRD_ROWS, 1e-15), (THIRD_ROWS + 1, opts.newton.tol / 10)):
            setup = SimpleNamespace(names=["Intercept", "x"], mask=np.ones((1, 1), bool), ndisp=0, n=n,
                                    factor_groups={})
            assert _newton_config(opts, setup).third_final == want
    for n, names, want in ((100, ["Intercept"], 0.0), (THIRD_ROWS + 1, ["Intercept"], FitOptions().newton.tol / 10),
                           (100, [f"x{i}" for i in range(8)], 0.0), (100, [f"x{i}" for i in range(23)], np.inf)):
        several = SimpleNamespace(names=names, mask=np.eye(2, dtype=bool), ndisp=0, n=n, factor_groups={"a": 3, "b": 4})
        cfg = _newton_config(FitOptions(), several)
        assert (cfg.third_final if len(names) + 2 <= cfg.third_max else np.inf) == want      # (never beyond third_max)


def test_a_final_points_third_derivatives_with_several_grouping_factors_have_every_entry():
    """An engine whose Hessian is a difference of gradients (several grouping factors: ``third_hessian``) sends at
    a final point every entry of its third derivatives -- they move the information over the last step, whose
    fixed effects count too -- and at a round's point those with an index among the covariance parameters alone
    (they shape the steps; P Hessians a point would cost the rounds' points too much)."""
    from fedglmm.likelihood.linalg import symmetric_third, unpack_third
    from fedglmm.site.own_third import reply_third

    T = symmetric_third(np.random.default_rng(5).standard_normal((4, 4, 4)))

    class Engine:               # ℓ = T[x, x, x]/6: its Hessian T·x, here by "differences" (third_hessian)
        p = 2

        def third_hessian(self, y):
            return T @ np.asarray(y, float)

    x = np.array([0.2, -1.0, 0.5, 0.1])
    final = {"hess": T @ x}
    reply_third(Engine(), x, {"third": True}, final)
    assert np.allclose(unpack_third(final["third"], 4), T, rtol=0, atol=1e-8)
    point = {"hess": T @ x}
    reply_third(Engine(), x, {"third_at": [0]}, point, 0)
    got, cov = unpack_third(point["third"], 4), np.zeros((4, 4, 4), bool)
    for t in (2, 3):
        cov[t, :, :] = cov[:, t, :] = cov[:, :, t] = True
    assert np.allclose(got[cov], T[cov], rtol=0, atol=1e-6) and np.all(got[~cov] == 0.0)


def test_a_multilevel_sites_third_derivatives_at_a_final_point_from_its_hessians_gradients():
    """At a final point (its Hessian central differences of the analytic gradient, ``final``) the multi-level GLMM
    engine's third derivatives come from those gradients and P(P - 1)/2 more, every entry (reply_third): at
    grouseticks' estimate (LOCATION's SD at zero: even_third) and off it they agree with central differences of
    central Hessians 1e-4 apart to 1e-4 of their largest entry (P polished Hessians took P² gradients)."""
    from fedglmm.likelihood.linalg import unpack_third
    from fedglmm.likelihood.steps import even_third
    from fedglmm.site.own_third import reply_third

    eng = _grouse_multilevel()
    P, calls, grad = eng.p + eng.ntheta, [], eng.value_grad

    def counted(*args, **kw):
        calls.append(1)
        return grad(*args, **kw)

    for x, zero in zip(GROUSE_POINTS, ([4], [])):
        want = _central_third(eng, x)
        reply = dict(eng.sums(x, final=True))
        eng.value_grad, calls[:] = counted, []
        got = even_third(x, unpack_third(reply_third(eng, x, {"third": True}, reply)["third"], P), zero)
        eng.value_grad = grad
        assert len(calls) == P * (P - 1) // 2
        assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want)), np.max(np.abs(got - want))


def test_starts_where_groups_stayed_bring_third_derivatives():
    """NewtonConfig.third_start and third_start_cov (the hybrid's, where groups' summaries stayed at their sites):
    the first round asks for the sites' third derivatives at every start, with the second along the covariance
    parameters alone -- not without them, nor over more than THIRD_ROWS rows or with several grouping factors; with
    third_steps (the hybrid's) a round's points that bring them include the steps to third order from the current
    point."""
    from dataclasses import replace
    from types import SimpleNamespace

    from fedglmm.likelihood.candidates import unbounded
    from fedglmm.likelihood.fit import THIRD_ROWS, _newton_config
    from fedglmm.likelihood.newton import TrustRegionNewton
    from fedglmm.model.options import FitOptions, NewtonConfig

    x0, others = np.zeros(3), [np.ones(3), -np.ones(3)]
    on, off = (TrustRegionNewton(x0, NewtonConfig(third_start=t, third_steps=t), starts=others) for t in (True, False))
    assert on.want_third and not on.third_cov and on.third_points == [0, 1, 2] and not off.want_third
    cov = TrustRegionNewton(x0, NewtonConfig(third_start_cov=True), starts=others)
    assert cov.want_third and cov.third_cov and cov.third_points == [0, 1, 2]
    H = np.eye(3)
    for opt in (on, off):
        newton, third = unbounded(np.ones(3), 1.0, H), unbounded(np.full(3, 1.1), 0.95, H)
        newton.newton = True
        opt._cands, opt._third_more = [newton, unbounded(np.full(3, 0.5), 0.97, H), third], [third]
        # (Newton's step, and no other beside it: the candidate predicted to gain second most too)
        assert opt._third_points(None) == ([0, 1, 2] if opt is on else [0, 1])
    opts = FitOptions(newton=NewtonConfig(third_start=True, third_start_cov=True))
    for n, rows, groups, want in ((THIRD_ROWS, 1, {}, True), (THIRD_ROWS + 1, 1, {}, False),
                                  (100, 2, {"a": 3, "b": 4}, False)):
        setup = SimpleNamespace(names=["Intercept"], mask=np.eye(rows, dtype=bool), ndisp=0, n=n, factor_groups=groups)
        cfg = _newton_config(replace(opts, newton=replace(opts.newton, third_steps=True)), setup)
        assert cfg.third_start is want and cfg.third_start_cov is want and cfg.third_steps is want


def test_information_at_the_estimate_with_the_hessians_second_order_change():
    """After a last step s to third order from the final point x (third derivatives T there), the information at the
    estimate is H(x) + T[s] and, along the last move d from the point before, ½Q[s, s] from H(x − d) − H(x) + T[d]:
    on F(x) = Σ exp(aᵢᵀx) its error is a tenth of what H + T[s] leaves, or less."""
    from types import SimpleNamespace

    from fedglmm.likelihood.last_step import information_at_estimate

    A = np.array([[1.0, 0.5], [0.0, 1.0], [0.7, -0.4]])
    hess = lambda x: sum(np.outer(a, a) * np.exp(a @ x) for a in A)                          # noqa: E731
    third = lambda x: sum(np.einsum("i,j,k->ijk", a, a, a) * np.exp(a @ x) for a in A)     # noqa: E731
    x, d = np.array([0.2, -0.1]), np.array([0.03, 0.02])
    for s in (0.05 * d, 0.02 * d + np.array([0.0, 1e-4]), -0.1 * d):
        opt = SimpleNamespace(point=x, previous=SimpleNamespace(x=x - d, H=hess(x - d)),
                              current=SimpleNamespace(H=hess(x)), third_used=third(x), third_here=True,
                              third_dear=False, model=None)
        want = hess(x + s)
        old = np.max(np.abs(hess(x) + third(x) @ s - want))
        new = np.max(np.abs(information_at_estimate(opt, hess(x), x + s) - want))
        assert old > 1e-7 and new < 0.1 * old, (old, new)
        opt.third_here = False       # T of the point before: no second-order term
        assert np.allclose(information_at_estimate(opt, hess(x), x + s), hess(x) + third(x) @ s, rtol=0, atol=1e-15)


@pytest.mark.parametrize("nagq", [1, 10])
def test_a_sites_third_derivatives_along_the_covariance_parameters_alone(nagq):
    """``third_cov`` beside ``third_at`` (the hybrid's starts where groups' summaries stayed at their sites): the
    entries with an index among the covariance parameters are those of the full third derivatives (to 1e-4 of their
    largest entry: the full ones average each entry over the slices of its three indices, each of first order in its
    step, and differ from one slice by 5e-5 of it here, by quadrature 4e-6), the pure fixed-effect block is 0, and
    they cost len(θ) Hessians (Laplace) or, by quadrature, the gradients of the pairs with a covariance index,
    instead of P or P(P - 1)/2."""
    from fedglmm.likelihood.laplace import GLMMLikelihood
    from fedglmm.likelihood.linalg import unpack_third
    from fedglmm.site.own_third import reply_third

    df = pd.read_csv(Path(__file__).parent / "data" / "cbpp.csv", dtype={"period": str})
    spec, fam = parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)"), get_family("binomial")
    schema = merge_schema({"s": describe_frame(df, spec, "s")}, spec, fam)
    eng = GLMMLikelihood(build_design(spec, schema, df, fam, "s"), fam, nagq)
    x = np.array([-1.2, -1.1, -1.0, -1.7, 0.9])
    calls, hess, grad = [], eng.sums, eng.value_grad

    def counted(method):
        def inner(*args, **kw):
            calls.append(1)
            return method(*args, **kw)
        return inner

    got = {}
    for cov in (False, True):
        req, reply = {"third_at": [0], **({"third_cov": True} if cov else {})}, dict(eng.sums(x))
        if nagq == 1:           # (Hessians: the engine's sums; by quadrature, its gradients)
            eng.sums = counted(hess)
        else:
            eng.value_grad = counted(grad)
        calls.clear()
        got[cov] = unpack_third(reply_third(eng, x, req, reply, 0)["third"], 5)
        got[cov, "calls"] = len(calls)
        eng.sums, eng.value_grad = hess, grad
    full, part = got[False], got[True]
    on = np.zeros((5, 5, 5), bool)
    on[4], on[:, 4], on[:, :, 4] = True, True, True
    assert np.max(np.abs(part[on] - full[on])) < 1e-4 * np.max(np.abs(full)), np.max(np.abs(part[on] - full[on]))
    assert np.all(part[~on] == 0.0) and np.max(np.abs(full[~on])) > 1e-3 * np.max(np.abs(full))
    assert (got[False, "calls"], got[True, "calls"]) == ((5, 1) if nagq == 1 else (10, 4)), got
