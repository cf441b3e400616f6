"""Rounds of the hybrid (the default) on the kinds of data that cost rounds, and the stopping rule.

The held-out group `rounds` (tests/data/heldout/rounds/: toenail and its simulated twin, epil as poisson,
Salamanders, guImmun, rare events, many sites with few groups each, a large random-effect variance, 1,000
groups of 3, a random slope with groups of 5, huge counts, probit, 60 sites of 3 count groups of SD 1.5;
Laplace and nAGQ 20), pooled and split over sites (by the case's `split` column where it is not the grouping
factor, else by group into 3 sites):
the hybrid ends where the iterative method does (1e-8) in few rounds, at a logLik no lower than the better
of lme4 / glmmTMB less 1e-4.  The stopping rule is checked against the optimum found by continuing the
Newton iteration to machine precision.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.model.formula import parse_formula
from fedglmm.model.options import NewtonConfig
from reference import best_reference, read_cases

ROUNDS = Path(__file__).parent / "data" / "heldout" / "rounds"

# split fits allowed 5 rounds: none since the sites pool their small groups in bins (toenail over three
# sites, every patient below min_group, took 5 with the start from the sites' own fits alone)
SPLIT_FIVE: set = set()
SPLIT_LIMIT: dict = {}


def _cases() -> list[dict]:
    """The held-out rounds cases, each with ``best``: the better full logLik of lme4 and glmmTMB."""
    return [dict(case, best=best_reference(case)) for case in read_cases(ROUNDS / "cases.tsv")]


CASES = _cases()


def _sites(df: pd.DataFrame, case: dict) -> dict:
    group = parse_formula(case["formula"]).group
    if case["split"] and case["split"] != group:
        return {str(k): part.reset_index(drop=True) for k, part in df.groupby(case["split"], sort=False)}
    return _dealt(df, case, 3)


def _dealt(df: pd.DataFrame, case: dict, k: int) -> dict:
    """The case's groups dealt round-robin to ``k`` sites."""
    codes = pd.factorize(df[parse_formula(case["formula"]).group])[0]
    return {f"s{i}": df[codes % k == i].reset_index(drop=True) for i in range(k)}


def _fit(case, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fedglmm.fit(case["formula"], data, family=case["family"], link=case["link"], nagq=case["nagq"], **kw)


def _same(a, b, tol=1e-8):
    assert np.allclose(a.fixef, b.fixef, rtol=0, atol=tol)
    assert np.allclose(a.theta, b.theta, rtol=0, atol=tol)
    # absolute: the poisson log-density is summed less its saturated value, so counts of 3·10⁴ (sim_pois_huge)
    # keep the logLik's digits (summed as y η − e^η, the two methods' logLiks were 3e-8 apart there)
    assert abs(a.loglik - b.loglik) < tol


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_hybrid_rounds_on_heldout_kinds(case):
    """Pooled (one site: its own fit, checked in one round) in 2 rounds; split over sites in at most 4 but
    for the documented small-group splits; always the iterative fit, and as good as the references."""
    df = pd.read_csv(case["data"])
    exact = _fit(case, df, method="iterative")
    pooled = _fit(case, df)
    assert pooled.converged and pooled.rounds == 2, pooled.rounds
    _same(pooled, exact)
    split = _fit(case, _sites(df, case))
    limit = SPLIT_LIMIT.get(case["name"], 5 if case["name"] in SPLIT_FIVE else 4)
    assert split.converged and split.rounds <= limit, split.rounds
    _same(split, exact)
    assert exact.loglik >= case["best"] - 1e-4, (exact.loglik, case["best"])


def test_third_derivatives_at_the_face_steps_of_an_indefinite_start():
    """sim_rare_gh20 (rare events by quadrature) over 20 sites: the best start's Hessian is indefinite, and the
    round's steps onto the SD's face or in Σ's entries now bring the sites' third derivatives; from the one
    accepted (a decrement of 4e-3) the final candidate is the step to third order (``land`` 3e-10) where it was the
    pseudo-data model's step (which left 4.3e-7, where the fourth derivatives along an unknown direction allowed no
    end): 4 rounds, not 5, at the fit continued to machine precision, standard errors to 1e-8."""
    case = next(c for c in CASES if c["name"] == "sim_rare_gh20")
    df = pd.read_csv(case["data"])
    opt = _fit(case, df, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    res = _fit(case, _dealt(df, case, 20))
    assert res.converged and res.rounds <= 4, res.rounds
    _same(res, opt)
    assert np.allclose(res.se, opt.se, rtol=1e-8, atol=0)


STOPPING = ["toenail_gh20", "sim_epil_la", "salamanders_pois", "sim_slope5", "sim_pois_huge"]


@pytest.mark.parametrize("name", STOPPING)
def test_stopping_rule_is_at_the_optimum(name):
    """Continuing the Newton iteration to machine precision moves the logLik by less than 1e-6 and the
    estimates by less than 1e-8 from where either method stopped."""
    case = next(c for c in CASES if c["name"] == name)
    df = pd.read_csv(case["data"])
    opt = _fit(case, df, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    for res in (_fit(case, df), _fit(case, df, method="iterative"), _fit(case, _sites(df, case))):
        assert abs(res.loglik - opt.loglik) < 1e-6
        _same(res, opt)


@pytest.mark.parametrize("name", ["sim_epil_la", "sim_salamanders", "sim_pois_huge"])
def test_negative_binomial_at_the_poisson_limit(name):
    """Counts simulated as poisson, fitted as negative binomial: the optimum is the poisson limit ϑ = ∞,
    whose logLik is glmmTMB's poisson fit's (the case's reference).  Pooled and over 3 sites both methods get
    there (ϑ beyond 1e8, the logLik within 1e-8 of glmmTMB's and 1e-9 of each other; counts of 2e4 in
    sim_pois_huge, whose ℓ at ϑ = 1e13 is still 1e-7 from the limit); the hybrid pooled in 2 rounds (the site's
    own fit), over 3 sites in at most 4 (sim_epil_la took 7 on one machine and 6 on another, its ψ stepped
    past 30 by Newton's steps in its rounding, to where its derivatives overflowed), the iterative method in
    at most 9."""
    case = dict(next(c for c in CASES if c["name"] == name), family="negative_binomial")
    ref = json.loads((ROUNDS / f"{name}.tmb.json").read_text())["logLik"]
    df = pd.read_csv(case["data"])
    for data, most in ((df, 2), (_sites(df, case), 4)):
        hybrid, iterative = _fit(case, data), _fit(case, data, method="iterative")
        for res in (hybrid, iterative):
            assert res.converged and res.dispersion["theta"] > 1e8, res.dispersion
            assert abs(res.loglik - ref) < 1e-8, (res.loglik, ref)
        _same(hybrid, iterative, tol=1e-6)
        assert abs(hybrid.loglik - iterative.loglik) < 1e-9
        assert hybrid.rounds <= most and iterative.rounds <= 9, (hybrid.rounds, iterative.rounds)


def _slope_without_intercept(seed: int) -> dict:
    """A binary outcome with a random slope on x1 (SD 0.5) and no random intercept, fitted with (1 + x1 | g):
    45 groups of 2-59 rows over 2 sites (the shape of benchmarks/singular_slope_rounds.py)."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(45), rng.integers(2, 60, 45))
    x1, x2 = rng.normal(size=g.size), rng.binomial(1, 0.4, g.size)
    eta = -1.0 + 0.5 * x1 - 0.4 * x2 + rng.normal(0, 0.5, 45)[g] * x1
    df = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x1": x1, "x2": x2, "g": g})
    return {f"s{j}": df[df.g % 2 == j] for j in range(2)}


@pytest.mark.parametrize("seed", [3, 6])
def test_intercept_sd_near_zero_beside_a_slope(seed):
    """The intercept's SD goes to 0 (Λ₁₁ ~ 0.03 and 4e-4) beside a slope's: lme4's θ is then a circle-
    shaped valley, where Newton in θ crawled (seed 3: hybrid 9, iterative 18 rounds; seed 6: the hybrid
    stopped at 60 rounds without converging).  With the step in the reversed Cholesky factor both
    methods reach the optimum of the iteration run to machine precision, the hybrid in ≤ 6 rounds."""
    data = _slope_without_intercept(seed)
    case = {"formula": "y ~ x1 + x2 + (1 + x1 | g)", "family": "binomial", "link": None, "nagq": 1}
    opt = _fit(case, data, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    hybrid, iterative = _fit(case, data), _fit(case, data, method="iterative")
    for res in (hybrid, iterative):
        assert abs(res.loglik - opt.loglik) < 1e-8, (res.loglik, opt.loglik)
        assert np.allclose(res.fixef, opt.fixef, rtol=0, atol=1e-6)
        sigma, want = next(iter(res.covariances().values())), next(iter(opt.covariances().values()))
        assert np.allclose(sigma, want, rtol=0, atol=1e-6), (sigma, want)    # Σ: θ is barely identified
    assert hybrid.rounds <= 6 and iterative.rounds <= 10, (hybrid.rounds, iterative.rounds)


def _stress_draw(seed: int, fit: int) -> tuple:
    """Fit number ``fit`` of benchmarks/stress_methods.py --seed ``seed`` (formula, family, sites)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from stress_methods import draw

    rng = np.random.default_rng(seed)
    for i in range(fit + 1):
        formula, family, data, *_ = draw(rng, i)
    return formula, family, data


@pytest.mark.parametrize("seed,fit,limit", [(4, 60, 6), (5, 0, 6), (7, 80, 6), (3, 0, 6), (11, 80, 6),
                                            (15, 95, 5), (3, 35, 6), (16, 80, 5), (13, 0, 6), (28, 80, 6),
                                            (40, 20, 7)])
def test_stress_fits_at_a_singular_covariance(seed, fit, limit):
    """Random-slope fits of benchmarks/stress_methods.py whose optimum, or a site's own fit, is at or near a
    singular Σ.  Seeds 4 and 5: the intercept's SD near 0 (hybrid 36 and 42 rounds before the
    reversed-factor step).  Seeds 7 and 3: Σ singular at a saddle of F (correlation −1, the optimum at
    −0.79 and −0.69), which the fit reaches first; turning Λ's row off it (CovarianceSteps.turns) took
    seed 7 from 10 to 6 rounds and seed 3 from 13 to 10, and the step in Σ's entries proposed again after
    a turn or one of its own seed 3 on to 6.  Seed 11 fit 80: an intercept SD of 0.01 beside a slope's 0.5
    on the way, where the correlation crawled along a ridge for 39 rounds until the step in Σ's entries was
    proposed wherever Σ is nearly singular (NEARLY_SINGULAR).  Seed 15 fit 95 and seed 3 fit 35 (poisson,
    an intercept SD of 2.5): a site's own fit at a correlation of 1 dragged the combined start (7 and 8
    rounds) until the combination without its θ was tried beside (without_singular).  Seed 16 fit 80 and
    seed 13 fit 0: the curvature in the slope's SD turned negative within a hair of 0 (2.5e-6, beside an
    intercept SD of 0.02), and the trust-region steps left the zero for rounds (8 and 8) until the point
    with that SD at 0 was tried beside them (boundary.face_step).  Seed 28 fit 80: Λ₂₂ (a slope's
    correlation going to 1) shrank by a third a round, F rising in it more like Λ₂₂⁴ than Λ₂₂², until
    Newton shrank it by half (7 rounds); the model in its square is now tried from the second such shrink
    in a row (boundary_step).  Seed 40 fit 20: every start at correlation 1 beside an intercept SD of 0.003,
    the optimum at 0.79 only 2.4e-4 lower; at the saddle H was positive definite (F steep in the slope's SD,
    whose gradient of 1e-2 hid the curvature of −0.013 along the turn), Newton crawled off it until a step to
    third order jumped: 10 rounds; turned where F curves down along the turn (CovarianceSteps.saddle), 7.
    Each against the iterative fit run to machine precision: logLik to 1e-8,
    fixed effects and Σ to 1e-6 (θ is barely identified where Λ₁₁ ~ 0)."""
    _against_precise(seed, fit, limit)


@pytest.mark.parametrize("seed,fit,limit", [(7, 60, 5), (40, 20, 6)])
def test_the_final_candidate_is_the_step_in_sigmas_entries_where_that_model_predicts_better(seed, fit, limit,
                                                                                            monkeypatch):
    """Fits of benchmarks/stress_methods.py near a nearly singular Σ (seed 7 fit 60: an intercept SD of 0 beside a
    slope; seed 40 fit 20: an intercept SD of 0.04 beside a slope's 0.36), where near the optimum the quadratic
    model in Σ's entries predicted the gradient at the point before 10³-10⁵ times better than θ's, and its step
    would have left decrements of 2e-13 and 1e-11 where the final candidates taken (Newton's, to third order) left
    8e-8 and 8e-7, each a final round more: with that step as the final candidate (newton_covariance.SIGMA_FINAL)
    6 -> 5 and 7 -> 6 rounds.  Against the iterative fit run to machine precision,
    and against the same fit without it (more rounds)."""
    import fedglmm.likelihood.newton_covariance as newton_covariance

    formula, family, data = _stress_draw(seed, fit)
    _against_machine_precision(formula, family, data, limit)
    monkeypatch.setattr(newton_covariance, "SIGMA_FINAL", 0.0)
    case = {"formula": formula, "family": family, "link": None, "nagq": 1}
    assert _fit(case, data).rounds > limit


@pytest.mark.parametrize("draw", [84, 110, 22])
def test_a_dispersion_family_tries_the_site_totals_start_beside_the_one_shot(draw):
    """Gamma fits of benchmarks/shape_sweep.py (log link; draws 84 and 110: ten sites of one group of about 100
    rows with a random slope; 22: five sites of three groups of 25), where no group stayed at its site: the
    one-shot fit put the Gamma's log shape at 0.87-0.91 in 84 and 110 (1.40-1.43 at the optimum; draw 84's start
    34 above the optimum's −logLik), and the trust-region rounds crawled (10, 6 and 7 rounds); the site totals'
    start beside it (with its moment estimate of ψ; until now only where groups stayed), 1.1 above in draw 84,
    took each to 4.  Against the iterative fit run to machine precision."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shape_sweep import draw as sweep_draw

    formula, family, data, _ = sweep_draw(draw)
    _against_machine_precision(formula, family, data, 4, link="log")


def test_a_large_sd_over_few_groups_starts_at_the_one_shot_sd_beside_the_sites_fits():
    """benchmarks/stress_methods.py --seed 27, fit 7: poisson, 8 groups of an SD of 2.5 over 4 sites, some groups
    too small for their moments to leave.  The sites' fits combined put the SD at 0.47 (3.8 at the optimum), 210
    above the optimum's -logLik, and the Newton rounds climbed from there: 8 rounds.  The one-shot fit's SD, with
    the combination's fixed effects given it, is now tried beside where groups stayed too: 4 rounds."""
    _against_precise(27, 7, 4)


def _against_precise(seed: int, fit: int, limit: int) -> None:
    """The default fit of a stress_methods draw against the iterative fit run to machine precision: logLik
    to 1e-8, fixed effects and the covariance to 1e-6, in at most ``limit`` rounds."""
    _against_machine_precision(*_stress_draw(seed, fit), limit)


def _against_machine_precision(formula: str, family: str, data: dict, limit: int, link: str | None = None) -> None:
    case = {"formula": formula, "family": family, "link": link, "nagq": 1}
    opt = _fit(case, data, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    res = _fit(case, data)
    assert abs(res.loglik - opt.loglik) < 1e-8, (res.loglik, opt.loglik)
    assert np.allclose(res.fixef, opt.fixef, rtol=0, atol=1e-6)
    sigma, want = next(iter(res.covariances().values())), next(iter(opt.covariances().values()))
    assert np.allclose(sigma, want, rtol=0, atol=1e-6), (sigma, want)
    assert res.rounds <= limit, res.rounds


@pytest.mark.parametrize("seed,limit", [(36, 5), (3, 4), (28, 4)])
def test_a_slope_of_small_sd_ends_without_a_round_of_several_points(seed, limit):
    """Fits of benchmarks/small_slope_rounds.py, a random slope whose SD is 0 or small.  Near the optimum
    (decrement under ``near``) a Newton step that shrinks the slope's Λ₂₂ by more than half no longer asks
    for a round of several points beside the step in Σ's entries (seeds 3 and 28: 5 rounds before, 4);
    where it grows Λ₂₂ by half or more the final candidate is the step in Σ's entries (seed 36, Λ₂₂ 0.02
    at the optimum: the Newton step in θ overshot it, 8 rounds before, 5).  Against the iterative fit run
    to machine precision, as above."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from small_slope_rounds import FORMULA, simulate

    family, sites, _ = simulate(seed)
    _against_machine_precision(FORMULA, family, sites, limit)


@pytest.mark.parametrize("seed,fit,limit", [(17, 63, 5), (5, 25, 6)])
def test_stress_start_chosen_with_its_fixed_effects_profiled(seed, fit, limit):
    """Fits of benchmarks/stress_methods.py whose lowest first-round start was off mostly in θ, while
    another, higher one was off mostly in β, which a Newton round puts right: going on from the lowest
    took 7 rounds on both; from the one lowest with β profiled (start_choice.best_start) 5 and 6.  Against
    the iterative fit run to machine precision (and the covariance), as above."""
    _against_precise(seed, fit, limit)


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
@pytest.mark.parametrize("method", ["hybrid", "iterative"])
def test_lmm_random_slope_at_a_singular_covariance(reml, method):
    """A gaussian random slope whose intercept SD is near 0 (correlation near 1): 81 groups of 2-11 rows over
    7 sites (tests/data/lmm_singular_slope.csv, numpy seed 21 in SOURCES.md).  Newton in θ alone crawled
    along the curved valley: REML did not converge within 60 rounds by either method, ML took 52 (hybrid).
    With the steps in Σ's entries (as for GLMMs) both end at lme4's optimum (bobyqa with rhoend 2e-9:
    benchmarks/r/lmm_singular_slope.R) in at most 12 rounds."""
    data = pd.read_csv(Path(__file__).parent / "data" / "lmm_singular_slope.csv")
    ref = json.loads((Path(__file__).parent / "data" / "lmm_singular_slope.json").read_text())["reml" if reml else "ml"]
    sites = {f"s{k}": data[data.g % 7 == k].reset_index(drop=True) for k in range(7)}
    res = fedglmm.fit("y ~ x + t + (1 + t | g)", sites, reml=reml, method=method)
    assert res.converged and res.rounds <= 12
    assert res.loglik >= ref["logLik"] - 1e-8
    assert np.allclose(res.fixef.to_numpy(), ref["fixef"], atol=1e-6)
    assert np.allclose(res.theta[:2], ref["theta"][:2], atol=1e-5)
    assert abs(res.theta[2]) < 1e-3 and abs(res.residual_sd - ref["sigma"]) < 1e-6


def test_lmm_start_that_ran_off_is_replaced():
    """A gaussian start far beyond any variance (the hybrid's pseudo-data fit of a site's few sent groups
    ran off to θ ≈ 6e5 on a simulated random slope: seed 23 of the same simulation) is replaced by the
    default start; there the criterion's sums lose definiteness and the fit ended 'not finite at the
    starting values' (a LinAlgError before that)."""
    from fedglmm.coordinator.schema import merge_schema
    from fedglmm.likelihood.engine import make_engine
    from fedglmm.likelihood.fit import LocalEvaluator, fit_lmm
    from fedglmm.likelihood.setup import make_setup, setup_reply
    from fedglmm.model.design import build_design, describe_frame
    from fedglmm.model.families import get_family
    from fedglmm.model.options import FitOptions

    data = pd.read_csv(Path(__file__).parent / "data" / "lmm_singular_slope.csv")
    spec, fam = parse_formula("y ~ x + t + (1 + t | g)"), get_family("gaussian")
    design = build_design(spec, merge_schema({"all": describe_frame(data, spec, "all")}, spec, fam), data, fam, "all")
    st = make_setup({"all": setup_reply(design, fam)}, 0)
    evaluator = LocalEvaluator({"all": make_engine(design, fam, 1, "observed", st.A, st.zs)}, {"all": None})
    est = fit_lmm(evaluator, st, FitOptions(), start=np.array([580753.2, -335410.0, 406941.0]))
    ref = fit_lmm(evaluator, st, FitOptions())
    assert est.converged and abs(est.loglik - ref.loglik) < 1e-9


@pytest.mark.parametrize("reml", [True, False], ids=["reml", "ml"])
def test_gaussian_sites_that_keep_their_groups_start_from_their_own_fits(reml):
    """Every group under the sites' minimum size (min_group 20, groups of 12): no group's statistics leave.
    The sites' own fits (θ̂ relative to σ̂, combined by numbers of groups) start the rounds instead of
    Λ̃ = I: extra_sim_gauss_factor over 3 sites, 7 -> 4 rounds, at the pooled fit."""
    from fedglmm.site import SiteConfig

    data = pd.read_csv(Path(__file__).parent / "data" / "extra_sim_gauss_factor.csv")
    codes = pd.factorize(data["g"])[0]
    sites = {f"s{i}": data[codes % 3 == i].reset_index(drop=True) for i in range(3)}
    res = fedglmm.fit("y ~ x * f + (1 | g)", sites, reml=reml,
                      site_config=SiteConfig(min_rows=10, min_cell=0, min_group=20))
    pooled = fedglmm.fit("y ~ x * f + (1 | g)", data, reml=reml, method="iterative")
    assert res.rounds <= 4 and abs(res.loglik - pooled.loglik) < 1e-8
    assert np.allclose(res.theta, pooled.theta, atol=1e-7)
    assert any("started from the sites' own fits" in m for m in res.messages)


@pytest.mark.parametrize("name,sites", [("toenail_la", 20), ("epil_pois_la", 10)])
def test_third_derivatives_at_the_final_point_end_the_fit(name, sites):
    """Over many sites the final candidate can land just above the tolerance (toenail over 20 sites: 2e-7,
    epil over 10: 2e-7); the sites' third derivatives at that point, asked for in the same final round, give
    the last step to third order and the fit ends there -- a round earlier than without them, at the same
    estimates, standard errors and logLik as the iterative fit continued to machine precision."""
    case = next(c for c in CASES if c["name"] == name)
    df = pd.read_csv(case["data"])
    data = _dealt(df, case, sites)
    exact = _fit(case, df, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    with_third, without = _fit(case, data), _fit(case, data, newton=NewtonConfig(final_third=False))
    assert with_third.converged and with_third.rounds <= 4 and with_third.rounds == without.rounds - 1, \
        (with_third.rounds, without.rounds)
    for res in (with_third, without):
        _same(res, exact)
        assert np.allclose(res.se, exact.se, rtol=1e-7, atol=0)


def _four_rounds_at_the_optimum(name, sites: int, se_rtol: float = 1e-7):
    """The held-out case ``name`` (or a case dict) dealt to ``sites`` sites by group ends in at most 4 rounds at the
    iterative fit continued to machine precision (estimates and logLik to 1e-8, standard errors to ``se_rtol``
    relative); (the fit, the continued one)."""
    case = name if isinstance(name, dict) else next(c for c in CASES if c["name"] == name)
    df = pd.read_csv(case["data"])
    data = _dealt(df, case, sites)
    exact = _fit(case, df, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    res = _fit(case, data)
    assert res.converged and res.rounds <= 4, res.rounds
    _same(res, exact)
    assert np.allclose(res.se, exact.se, rtol=se_rtol, atol=0), np.max(np.abs(res.se / exact.se - 1))
    return res, exact


@pytest.mark.parametrize("name,sites", [("epil_pois_gh20", 10), ("sim_epil_gh20", 20), ("toenail_gh20", 20),
                                        ("sim_toenail_gh20", 20)])
def test_quadrature_fits_take_third_derivatives_at_a_rounds_points(name, sites):
    """By adaptive Gauss-Hermite too the points of a round near the optimum bring the sites' third derivatives
    (from the gradients of their Hessians and P(P - 1)/2 more), the model's and Newton's, and a step to third order
    from the point accepted is the final candidate: 4 rounds where these took 5 -- at the fit continued to machine
    precision."""
    _four_rounds_at_the_optimum(name, sites)


@pytest.mark.parametrize("name,sites", [("guimmun_la", 10), ("sim_guimmun_la", 20), ("guimmun_la", 5)])
def test_more_than_eight_parameters_on_few_rows_take_third_derivatives(name, sites):
    """A fit of 17 parameters on ~2,000 rows (a binary outcome, 10 covariates of which several factors, ~160
    communities) asks for the sites' third derivatives at a round's points near the optimum, as fits of at most 8
    do (a few Hessians of so few rows cost less than a round): 4 rounds where these took 6, 5 and (over 5 sites,
    asking from a decrement of 45) 5, at the fit continued to machine precision."""
    _four_rounds_at_the_optimum(name, sites)


@pytest.mark.parametrize("name,sites", [("sim_rare_gh20", 2), ("toenail_gh20", 2), ("sim_rare_la", 2),
                                        ("sim_guimmun_la", 10)])
def test_standard_errors_at_the_optimum_where_the_last_step_is_newtons(name, sites):
    """A fit ending at a final point 1e-10 to 3e-8 above the optimum, reached by Newton's or the pseudo-data model's
    step (no third derivatives asked for at its round), moved the information to the estimate by the secant of the
    step before: standard errors 2.3e-7 to 2.8e-6 off.  The final point brings the sites' third derivatives where its
    decrement is predicted above 1e-15 (by quadrature P(P - 1)/2 gradients beside its Hessian's; with 17
    parameters too): within 1e-8 of the fit continued to machine precision."""
    _four_rounds_at_the_optimum(name, sites, se_rtol=1e-8)


def test_a_step_in_sigmas_entries_where_newtons_lands_does_not_hold_back_the_final_round():
    """Rare events by nAGQ 20 over 10 sites: at 0.004 above the optimum Newton's step shrinks the SD by a quarter,
    and the round tried the step in Σ's entries beside it -- landing within 1 % of the decrement of Newton's -- so
    it was not a final round, and one more followed (5 rounds).  Near the optimum such a step is not tried: 4
    rounds, at the fit continued to machine precision."""
    _four_rounds_at_the_optimum("sim_rare_gh20", 10)


@pytest.mark.parametrize("name", ["grouseticks_la", "grouseticks_nb"])
def test_reference_cases_split_one_location_per_site(name):
    """The reference cases on grouseticks split as the reference's README splits them: one site per LOCATION
    (63 sites; 54 of them one location of fewer than 10 rows, which sends no summaries).  The start comes
    from the 9 larger locations, its SD halved and doubled with the intercept moved to keep the marginal
    mean, and the point reached from it brings the sites' third derivatives: at most 4 rounds (were 5), at
    the fit continued to machine precision."""
    from golden import cases

    case = next(c for c in cases() if c["name"] == name)
    df = pd.read_csv(case["data"])
    data = {str(k): part.reset_index(drop=True) for k, part in df.groupby("LOCATION", sort=False)}
    exact = _fit(case, df, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    res = _fit(case, data)
    assert res.converged and res.rounds <= 4, res.rounds
    _same(res, exact)


def test_a_rejected_final_step_of_the_model_leaves_newtons_reach():
    """guImmun over 10 sites (communities dealt round-robin): the pseudo-data model's final step from a
    decrement of 0.02 gains nothing; the next round takes Newton's step, not one of a trust region cut to a
    quarter of the model's step (7 rounds then, 6 now), and ends at the iterative fit."""
    case = next(c for c in CASES if c["name"] == "guimmun_la")
    df = pd.read_csv(case["data"])
    data = _dealt(df, case, 10)
    res = _fit(case, data)
    assert res.converged and res.rounds <= 6, res.rounds
    _same(res, _fit(case, df, method="iterative"))


@pytest.mark.parametrize("name,sites", [("epil_pois_la", 20), ("epil_pois_gh20", 20)])
def test_a_start_from_site_totals_takes_third_derivatives_at_its_points(name, sites):
    """Overdispersed counts of 59 subjects over 20 sites: every subject's 4 rows stay at its site and no site fits a
    model of its own, so the start comes from site totals, 9.4 above the optimum.  Its points bring the sites' third
    derivatives, the next round tries the steps to third order (to 0.007, where Newton's reached 0.47) with theirs,
    and the step to third order from there is final: 4 rounds where these took 5, at the fit continued to machine
    precision."""
    _four_rounds_at_the_optimum(name, sites, se_rtol=1e-8)


@pytest.mark.parametrize("method,sites,rounds", [("iterative", 1, 8), ("hybrid", 20, 5)])
def test_a_fit_ended_by_a_step_to_third_order_from_1e_8_keeps_its_standard_errors(method, sites, rounds):
    """Simulated toenail (Laplace): the points of the steps to third order bring the sites' third derivatives too (the
    hybrid's NewtonConfig.third_steps; the iterative method's where asked), and the next step to third order reaches
    1e-8 to 3e-8 above the optimum, where the fit ends (the iterative method 9 -> 8 rounds pooled, the hybrid 6 -> 5
    over 20 sites).  The information moves to the estimate with the Hessian's second-order change along the last
    move as well: standard errors within 1e-8 of the fit continued to machine precision (1.3e-8 and 3.2e-8 without
    it)."""
    case = next(c for c in CASES if c["name"] == "sim_toenail_la")
    df = pd.read_csv(case["data"])
    exact = _fit(case, df, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    kw = {"newton": NewtonConfig(third_steps=True)} if method == "iterative" else {}
    res = _fit(case, df if sites == 1 else _dealt(df, case, sites), method=method, **kw)
    assert res.converged and res.rounds <= rounds, res.rounds
    _same(res, exact)
    assert np.allclose(res.se, exact.se, rtol=1e-8, atol=0), np.max(np.abs(res.se / exact.se - 1))


def test_sites_of_few_groups_take_third_derivatives_along_the_covariance_at_the_starts():
    """epil as a negative binomial (overdispersed counts of 59 subjects) dealt to 10 sites: every subject's 4 rows
    stay at its site, the sites' fits of ~6 subjects each start the fit 9 above the optimum, and Newton's step from
    there reached 0.9 (5 rounds).  The first round's points bring the sites' third derivatives along the covariance
    parameters and ψ (NewtonConfig.third_start_cov: 2 Hessians a point, not 7); the step to third order with them
    reaches 0.003: 4 rounds, at the fit continued to machine precision."""
    case = {"formula": "y ~ trt + lbase + lage + V4 + (1 | subject)", "family": "negative_binomial", "link": None,
            "nagq": 1, "data": ROUNDS.parent / "families" / "epil.csv"}
    res, exact = _four_rounds_at_the_optimum(case, 10, se_rtol=1e-8)
    assert abs(res.dispersion["theta"] / exact.dispersion["theta"] - 1) < 1e-8


@pytest.mark.parametrize("name,sites", [("toenail_la", 5), ("toenail_gh20", 10)])
def test_binary_starts_along_the_attenuation_curve_from_the_totals(name, sites):
    """Toenail over 5 and 10 sites (every patient below min_group): the best start from the sites' fits was at an
    SD of 7.2 for 4.6 (10 sites), the site totals' at 1.4; the totals' start moved along the attenuation curve to
    SDs 2.8 and 4.3 (coordinator.starts.binary_variants) is among the first round's points: 4 rounds where these
    took 5 and 6, at the fit continued to machine precision."""
    _four_rounds_at_the_optimum(name, sites)


def test_iterative_fit_of_large_counts_does_not_run_off_along_a_ridge():
    """Counts of 3000 over 28 groups with an SD of 1.3 (tests/data/poisson_large_counts.csv, drawn by
    benchmarks/nb_poisson_limit.py --seed 1, fit 17): from the site totals' start (intercept 9.5 for 7.8) the
    iterative method's first Newton step overshot to 1.4, where H is indefinite, and the trust region's steps
    followed the ridge of intercept and SD to 191 and 22 until the run-off check ended the fit, not converged.
    With the fixed effects' Newton step at θ held among the candidates there, it converges, to the hybrid's fit."""
    df = pd.read_csv(Path(__file__).parent / "data" / "poisson_large_counts.csv")
    formula = "y ~ x + factor(f) + (1 | g)"
    iterative = fedglmm.fit(formula, df, family="poisson", method="iterative")
    hybrid = fedglmm.fit(formula, df, family="poisson")
    assert iterative.converged and hybrid.converged
    assert abs(iterative.loglik - hybrid.loglik) < 1e-8
    assert np.max(np.abs(iterative.fixef - hybrid.fixef)) < 1e-6
