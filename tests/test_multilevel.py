"""Several grouping factors (nested and crossed): the sparse factor, the engines and the fits.

* the block Cholesky of H (:mod:`fedglmm.likelihood.sparse`) against dense linear algebra: log det,
  solves, the selected inverse, for nested, crossed and mixed patterns;
* the Laplace engine's analytic gradient against central differences of its value, and its Hessian
  against second differences of the value; its value against a brute-force Laplace approximation (dense
  H, modes by scipy); on a single-factor design it equals the batched single-factor engine;
* the exact LMM sums against the dense V = I + ZΛΛᵀZᵀ, their θ-derivatives against differences;
* fits against lme4 and glmmTMB (the shared multi-level cases and a subset of the held-out ones; all of
  them: ``benchmarks/parity_multilevel.py``), the same data split over sites by its top-level factor,
  and the refusals (a level at two sites, quadrature, one-shot).
"""
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

try:
    import fedglmm  # noqa: F401
except ImportError:      # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from multilevel_reference import cases, compare, fit, split_sites

from fedglmm.coordinator.schema import merge_schema
from fedglmm.errors import FedGLMMError, InputError, SchemaError
from fedglmm.likelihood.laplace import GLMMLikelihood
from fedglmm.likelihood.lmm import LMMSums
from fedglmm.likelihood.lmm_sparse import MultiLMMSums
from fedglmm.likelihood.multilevel import MultiLevelGLMM
from fedglmm.likelihood.sparse import Pattern
from fedglmm.model.design import build_design, describe_frame
from fedglmm.model.families import get_family
from fedglmm.model.formula import parse_formula

DATA = Path(__file__).parent / "data"
HELDOUT = DATA / "heldout" / "multilevel"
CASES = {c["name"]: c for c in cases()}


@lru_cache(maxsize=None)
def design(path, formula, family="poisson", link=None, rows=None):
    df = pd.read_csv(path)
    if rows:
        df = df.iloc[:rows]
    spec, fam = parse_formula(formula), get_family(family, link)
    schema = merge_schema({"s": describe_frame(df, spec, "s")}, spec, fam)
    return build_design(spec, schema, df, fam, "s"), fam


def dense(codes, G, q, w, M):
    """H = Σ w m mᵀ + I as a dense matrix, with the rows' m and each factor's offset."""
    offs = np.cumsum([0] + [g * k for g, k in zip(G, q)])
    n = len(w)
    Mfull = np.zeros((n, offs[-1]))
    for f in range(len(G)):
        for a in range(q[f]):
            Mfull[np.arange(n), offs[f] + codes[f] * q[f] + a] = M[f][:, a]
    return Mfull.T @ (w[:, None] * Mfull) + np.eye(offs[-1]), offs, Mfull


def patterns():
    rng = np.random.default_rng(1)
    ward = np.repeat(np.arange(4), 15)
    patient = np.repeat(np.arange(20), 3)
    perm = rng.permutation(60)
    n = 90
    p2, item = rng.integers(0, 15, n), rng.integers(0, 5, n)
    p2[:15], item[:5] = np.arange(15), np.arange(5)
    c = rng.integers(0, 4, n)
    c[:4] = np.arange(4)
    a, b = rng.integers(0, 12, 80), rng.integers(0, 7, 80)
    a, b = np.r_[a, np.arange(12)], np.r_[b, np.arange(12) % 7]
    return {"nested3": ([patient[perm], ward[perm], np.arange(60)], [20, 4, 60], [2, 1, 1]),
            "crossed": ([a, b], [12, 7], [1, 2]),
            "chain+tail": ([np.arange(n), p2, item], [n, 15, 5], [1, 2, 1]),
            "three crossed": ([p2, item, c], [15, 5, 4], [1, 1, 2])}


@pytest.mark.parametrize("name", list(patterns()))
def test_block_cholesky_against_dense(name):
    codes, G, q = patterns()[name]
    rng = np.random.default_rng(2)
    n = len(codes[0])
    w = rng.uniform(0.2, 2.0, n)
    M = [rng.normal(size=(n, k)) for k in q]
    pat = Pattern(codes, G, q)
    F = pat.factor(pat.assemble(w, M))
    H, offs, Mfull = dense(codes, G, q, w, M)
    assert abs(F.logdet - np.linalg.slogdet(H)[1]) < 1e-10
    b = [rng.normal(size=(g, k)) for g, k in zip(G, q)]
    x = np.concatenate([v.ravel() for v in F.solve(b)])
    assert np.allclose(x, np.linalg.solve(H, np.concatenate([v.ravel() for v in b])), atol=1e-12)
    Hi = np.linalg.inv(H)
    S = F.selected_inverse()
    for f, blocks in enumerate(S.diagonal_blocks()):
        for lv in range(G[f]):
            i = slice(offs[f] + lv * q[f], offs[f] + (lv + 1) * q[f])
            assert np.allclose(blocks[lv], Hi[i, i], atol=1e-12)
    Y, Yd = S.row_products(M), Mfull @ Hi
    for f in range(len(G)):
        for a in range(q[f]):
            assert np.allclose(Y[f][:, a], Yd[np.arange(n), offs[f] + codes[f] * q[f] + a], atol=1e-12)


def test_nested_factors_form_a_chain_and_crossed_ones_a_tail():
    pats = patterns()
    assert Pattern(*pats["nested3"]).nested and Pattern(*pats["nested3"]).chain == [2, 0, 1]
    crossed = Pattern(*pats["crossed"])
    assert crossed.chain == [0] and crossed.tail == [1] and crossed.R == 14


ENGINE_CASES = {
    "nested": (DATA / "grouseticks.csv", "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | LOCATION)", "poisson", None),
    "olre": (DATA / "cbpp_obs.csv", "cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs)",
             "binomial", None),
    "crossed slope": (HELDOUT / "sim_crossed_pois_slope.csv", "y ~ x + (1 + x | subject) + (1 | item)", "poisson", None),
    "nested slopes probit": (HELDOUT / "sim_mc_binary.csv", "y ~ time + (1 + time | patient) + (1 | hospital)",
                             "binomial", "probit"),
}


def _point(eng, seed=0):
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(scale=0.2, size=eng.p), 0.3 + 0.4 * rng.random(eng.ntheta)]


@pytest.mark.parametrize("key", list(ENGINE_CASES))
def test_gradient_and_hessian_against_differences(key):
    path, formula, family, link = ENGINE_CASES[key]
    d, fam = design(path, formula, family, link, rows=600)
    eng = MultiLevelGLMM(d, fam)
    phi = _point(eng)
    ev = eng.evaluate(phi)

    def value(x):
        return eng.value_grad(x, grad=False)[0]

    P = len(phi)
    fd, fd2 = np.zeros(P), np.zeros((P, P))
    for i in range(P):
        h = 1e-5 * (1 + abs(phi[i]))
        e = np.zeros(P)
        e[i] = h
        fd[i] = (value(phi + e) - value(phi - e)) / (2 * h)
    assert np.allclose(ev.grad, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd)))
    for i in range(P):
        for j in range(i, P):
            h = 1e-3
            ei, ej = np.eye(P)[i] * h, np.eye(P)[j] * h
            fd2[i, j] = fd2[j, i] = (value(phi + ei + ej) - value(phi + ei - ej) - value(phi - ei + ej)
                                     + value(phi - ei - ej)) / (4 * h * h)
    assert np.allclose(ev.hess, fd2, rtol=1e-3, atol=1e-4 * np.max(np.abs(fd2)))


def test_expected_curvature_gradient():
    path, formula, family, link = ENGINE_CASES["nested slopes probit"]
    d, fam = design(path, formula, family, link, rows=400)
    eng = MultiLevelGLMM(d, fam, curvature="expected")
    phi = _point(eng, 3)
    g = eng.value_grad(phi)[1]
    fd = np.array([(eng.value_grad(phi + e, grad=False)[0] - eng.value_grad(phi - e, grad=False)[0]) / 2e-6
                   for e in np.eye(len(phi)) * 1e-6])
    assert np.allclose(g, fd, rtol=1e-5, atol=1e-5 * np.max(np.abs(fd)))


def test_single_factor_design_equals_the_batched_engine():
    d, fam = design(DATA / "contraception.csv", "use ~ age + urban + (1 + urban | district)", "binomial")
    batched, sparse = GLMMLikelihood(d, fam), MultiLevelGLMM(d, fam)
    phi = np.r_[-0.2, 0.01, 0.5, 0.6, -0.3, 0.4]
    a, b = batched.evaluate(phi), sparse.evaluate(phi)
    assert abs(a.value - b.value) < 1e-9 and np.allclose(a.grad, b.grad, atol=1e-8)
    assert np.allclose(a.hess, b.hess, rtol=1e-5, atol=1e-5)
    (m1, s1), (m2, s2) = batched.conditional_modes(phi), sparse.conditional_modes(phi)
    assert np.allclose(m1, m2["district"], atol=1e-8) and np.allclose(s1, s2["district"], atol=1e-8)


def test_laplace_value_against_brute_force_on_a_crossed_design():
    """h(û) − ½ log det H with û found by scipy on the dense problem."""
    d, fam = design(DATA / "penicillin.csv", "I(diameter > 23) ~ 1 + (1 | plate) + (1 | sample)", "binomial",
                    rows=None)
    eng = MultiLevelGLMM(d, fam)
    phi = np.array([0.3, 0.8, 1.1])
    value = eng.value_grad(phi, grad=False)[0]
    lams = eng.lambdas(phi[1:])
    M = [d.Z[:, c] @ lam for c, lam in zip(eng.cols, lams)]
    eta0 = d.X @ phi[:1]

    def h(u):
        parts = np.split(u, np.cumsum(eng.G)[:-1])
        eta = eta0 + sum(Mf[:, 0] * p[c] for Mf, p, c in zip(M, parts, eng.codes))
        return -(np.sum(fam.loglik(d.y, d.trials, eta)) - 0.5 * u @ u)

    u = optimize.minimize(h, np.zeros(sum(eng.G)), method="BFGS", options={"gtol": 1e-10}).x
    parts = np.split(u, np.cumsum(eng.G)[:-1])
    eta = eta0 + sum(Mf[:, 0] * p[c] for Mf, p, c in zip(M, parts, eng.codes))
    w = fam.curvature(d.y, d.trials, eta)[0]
    H = dense(eng.codes, eng.G, [1, 1], w, M)[0]
    brute = -h(u) - 0.5 * np.linalg.slogdet(H)[1] + fam.constant(d.y, d.trials)
    assert abs(value - brute) < 1e-6


@pytest.mark.parametrize("path, formula", [
    (HELDOUT / "pastes.csv", "strength ~ 1 + (1 | batch/cask)"),
    (DATA / "penicillin.csv", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    (HELDOUT / "sim_gauss3.csv", "y ~ time + trt + (1 + time | patient) + (1 + time | hospital)"),
])
def test_lmm_sums_against_the_dense_covariance(path, formula):
    d, _ = design(path, formula, "gaussian", rows=400)
    eng = MultiLMMSums(d)
    theta = 0.4 + 0.5 * np.random.default_rng(0).random(eng.ntheta)
    out = eng.evaluate(theta)
    M = [d.Z[:, cols] @ lam for cols, lam in zip(eng.cols, eng.lambdas(theta))]
    ZL = dense(eng.codes, eng.G, [len(c) for c in eng.cols], np.ones(d.n), M)[2]      # rows of ZΛ
    Vi = np.linalg.inv(np.eye(d.n) + ZL @ ZL.T)
    y = d.y
    assert np.allclose(out["A"], d.X.T @ Vi @ d.X, rtol=1e-9)
    assert np.allclose(out["b"], d.X.T @ Vi @ y, rtol=1e-9)
    assert abs(out["c"] - y @ Vi @ y) < 1e-9 * abs(out["c"])
    assert abs(out["d"] + np.linalg.slogdet(Vi)[1]) < 1e-8
    for t in range(eng.ntheta):
        h = 1e-6
        e = np.eye(eng.ntheta)[t] * h
        up, dn = eng.evaluate(theta + e, order=1), eng.evaluate(theta - e, order=1)
        for key in ("A", "b", "c", "d"):
            fd = (np.asarray(up[key]) - np.asarray(dn[key])) / (2 * h)
            assert np.allclose(out["d" + key][t], fd, rtol=1e-5, atol=1e-6 * (1 + np.max(np.abs(fd))))
            fd2 = (np.asarray(up["d" + key]) - np.asarray(dn["d" + key])) / (2 * h)
            assert np.allclose(out["d2" + key][t], fd2,
                               rtol=1e-4, atol=1e-4 * (1 + np.max(np.abs(fd2))))


def test_lmm_sums_single_factor_equal_the_batched_sums():
    d, _ = design(DATA / "sleepstudy.csv", "Reaction ~ Days + (Days | Subject)", "gaussian")
    theta = np.array([0.9, 0.1, 0.3])
    a, b = LMMSums(d).evaluate(theta), MultiLMMSums(d).evaluate(theta)
    for key in ("A", "b", "c", "d", "dA", "db", "dc", "dd"):
        assert np.allclose(a[key], b[key], rtol=1e-9), key
    for key in ("d2A", "d2b", "d2c", "d2d"):
        assert np.allclose(a[key], b[key], rtol=1e-5, atol=1e-6 * np.max(np.abs(a[key]))), key


# --- fits against lme4 and glmmTMB ----------------------------------------------------------------

PARITY = ["grouseticks_nested", "grouseticks_olre", "cbpp_olre", "penicillin_crossed", "penicillin_crossed_ml",
          "pastes_nested_reml", "oats_splitplot_ml", "sim_mc_binary_uncorr", "sim_pois_ward_slash", "epil_olre",
          "mmmec_olre", "sim_binom_agg_la", "sim_gauss3_hslope_ml", "sim_crossed_binom_la", "scotssec_reml",
          "sim_gauss_singular_reml"]


@pytest.fixture(scope="module")
def fits():
    return {}


def _fit(fits, name):
    if name not in fits:
        fits[name] = fit(CASES[name])
    return fits[name]


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_lme4_and_glmmtmb(name, fits):
    res = _fit(fits, name)
    assert compare(res, CASES[name]) == []
    assert res.rounds <= 10


@pytest.mark.parametrize("name, k", [("grouseticks_olre", 3), ("sim_mc_binary_uncorr", 6), ("pastes_inter_ml", 4)])
def test_split_over_sites_gives_the_pooled_fit(name, k, fits):
    """The default (hybrid) method from another split: estimates, variance components and logLik to 1e-8;
    standard errors (from the Hessian at the last point, moved to the estimate) to a relative 1e-4."""
    pooled = _fit(fits, name)
    split = fit(CASES[name], data=split_sites(CASES[name], k))
    assert split.nsites > 1
    assert abs(split.loglik - pooled.loglik) < 1e-8 * max(1, abs(pooled.loglik))
    assert np.allclose(split.fixef, pooled.fixef, rtol=1e-8, atol=1e-8)
    assert np.allclose([r.get("sd", r.get("corr")) for r in split.random],
                       [r.get("sd", r.get("corr")) for r in pooled.random], rtol=1e-7, atol=1e-8)
    assert np.allclose(split.se, pooled.se, rtol=1e-4)


def test_standard_errors_of_many_parameters_over_sites_equal_the_pooled_ones(fits):
    """guimmun's 18 parameters (two nested factors, a dozen fixed effects) over 3 sites: every final point brings the
    sites' third derivatives (from the gradients of its Hessian: site.own_third), which move the information to the
    estimate -- standard errors the pooled fit's to 1e-8 (5e-11 measured; 2.2e-7 while fits of more than 8
    parameters did not ask for them)."""
    pooled = _fit(fits, "guimmun_la")
    split = fit(CASES["guimmun_la"], data=split_sites(CASES["guimmun_la"], 3))
    assert len(pooled.se) + len(pooled.random) > 8
    assert np.allclose(split.se, pooled.se, rtol=1e-8, atol=0)


@pytest.mark.parametrize("name", ["sim_pois_ward", "epil_olre", "grouseticks_olre"])
def test_sites_fits_to_third_order_start_three_sites_within_four_rounds(name, fits):
    """Over 3 sites each site's fit of the full model comes with its third derivatives along the covariance
    parameters, and the first round tries the fits combined to third order; the last Newton point is the final
    one where the contraction promises a decrement the final round accepts.  Four rounds (five before), the
    pooled fit's estimates to 1e-8."""
    pooled = _fit(fits, name)
    split = fit(CASES[name], data=split_sites(CASES[name], 3))
    assert split.rounds <= 4
    assert abs(split.loglik - pooled.loglik) < 1e-8 * max(1, abs(pooled.loglik))
    assert np.allclose(split.fixef, pooled.fixef, rtol=1e-8, atol=1e-8)
    assert np.allclose([r.get("sd", r.get("corr")) for r in split.random],
                       [r.get("sd", r.get("corr")) for r in pooled.random], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name, k, rounds", [("sim_rare_la", 3, 4), ("mmmec_la", None, 5)])
def test_a_full_step_of_another_model_predicts_the_final_round(name, k, rounds, fits):
    """Where the step accepted last was a full step in log scale (or in Σ's entries), its contraction predicts
    the next one's as a Newton step's does, and the next point is the final candidate: one round fewer than
    before (5 and 6), the pooled fit's estimates to 1e-8 all the same."""
    pooled = _fit(fits, name)
    split = fit(CASES[name], data=split_sites(CASES[name], k))
    assert split.rounds <= rounds
    assert abs(split.loglik - pooled.loglik) < 1e-8 * max(1, abs(pooled.loglik))
    assert np.allclose(split.fixef, pooled.fixef, rtol=1e-8, atol=1e-8)
    assert np.allclose([r.get("sd", r.get("corr")) for r in split.random],
                       [r.get("sd", r.get("corr")) for r in pooled.random], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name, k", [("grouseticks_nested", 5), ("pastes_sample_reml", 3)])
def test_iterative_split_equals_pooled_exactly(name, k):
    """The iterative method's sums add up over the split: everything to 1e-8, and for the GLMM the same rounds.
    The REML fit's first round also proposes the step of a cubic model (:func:`fedglmm.likelihood.fit.fit_lmm`),
    which differs over the split (pooled: 1.371 scaled units, 3 sites: 1.416), and its last round sits on the
    stopping tolerance: on 3 December, on an AMD EPYC machine, the pooled fit's final candidate had a decrement of
    1.5e-7 against the tolerance of 1e-7 (6 rounds), the split's 1.75e-8 (5 rounds); elsewhere both took the same."""
    case = CASES[name]
    pooled = fit(case, method="iterative")
    split = fit(case, data=split_sites(case, k), method="iterative")
    assert abs(split.rounds - pooled.rounds) <= (1 if case["reml"] else 0), (split.rounds, pooled.rounds)
    for a, b in ((pooled.fixef, split.fixef), (pooled.se, split.se), (pooled.theta, split.theta)):
        assert np.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert abs(pooled.loglik - split.loglik) < 1e-8


@pytest.mark.parametrize("name", ["pastes_nested_reml", "sim_gauss3_ml", "penicillin_crossed"])
def test_gaussian_cells_give_the_exact_fit_in_one_round(name):
    """Per-cell sufficient statistics (the rows sharing a level of every factor) determine the gaussian
    likelihood: with every cell allowed to leave, the one-shot and hybrid fits are the iterative one."""
    case = CASES[name]
    ref = fit(case, method="iterative")
    for method in ("oneshot", "hybrid"):
        res = fit(case, method=method, min_group=1)
        assert res.rounds == 1
        assert abs(res.loglik - ref.loglik) < 1e-7 and np.allclose(res.fixef, ref.fixef, rtol=1e-7, atol=1e-8)
        assert np.allclose(res.se, ref.se, rtol=1e-6)
        assert np.allclose([r.get("sd", r.get("corr")) for r in res.random],
                           [r.get("sd", r.get("corr")) for r in ref.random], rtol=1e-6)
    held = fit(case)                                     # cells below min_group stay: Newton rounds
    assert held.rounds > 1 and "per-cell summaries stayed" in " ".join(held.messages)


@pytest.mark.parametrize("name", ["grouseticks_nested", "sim_mc_binary_uncorr", "scotssec_reml", "sim_gauss_singular_reml"])
def test_hybrid_takes_no_more_rounds_than_iterative(name, fits):
    assert _fit(fits, name).rounds <= fit(CASES[name], method="iterative").rounds


def test_a_level_at_two_sites_is_refused_naming_factor_level_and_sites():
    case = dict(CASES["sim_items_pois"], family="negative_binomial")    # poisson: fitted (test_shared_glmm)
    with pytest.raises(SchemaError) as e:
        fit(case, data=split_sites(case))
    assert str(e.value).startswith("group 'item' level ") and "is present at sites 's" in str(e.value)


def test_quadrature_and_oneshot_need_a_single_grouping_factor():
    case = CASES["sim_pois_ward"]
    with pytest.raises(InputError, match="nagq > 1 .* needs a single grouping factor"):
        fit(case, nagq=5)
    with pytest.raises(FedGLMMError, match="one-shot method fits binomial and poisson models with one grouping"):
        fit(case, method="oneshot")


def test_results_per_factor(fits):
    res = _fit(fits, "sim_pois_ward_slash")
    modes, sds = res.ranef(condvar=True)
    assert set(modes) == {"ward", "patient:ward"} == set(res.ngroups)
    assert modes["ward"].shape == (20, 1) and modes["patient:ward"].shape == (res.ngroups["patient:ward"], 1)
    assert (sds["ward"].to_numpy() > 0).all()
    text = res.summary()
    assert " ward " in text and " patient:ward " in text and "patient:ward, 278" in text
    js = res.to_dict()
    assert set(js["ranef"]) == {"ward", "patient:ward"} and js["ngroups"] == res.ngroups
    df = pd.read_csv(CASES["sim_pois_ward_slash"]["data"])
    new = df.iloc[:3].copy()
    eta = res.predict(new)
    ward = modes["ward"].loc[new.ward.astype(str)].to_numpy()[:, 0]
    pw = modes["patient:ward"].loc[(new.patient.astype(str) + ":" + new.ward.astype(str))].to_numpy()[:, 0]
    assert np.allclose(eta, res.predict(new, conditional=False) + ward + pw)
    new.loc[:, "ward"] = "unseen"                       # a new ward: its effect and its patients' are 0
    assert np.allclose(res.predict(new), res.predict(new, conditional=False))


def test_min_group_withholds_each_factors_small_levels():
    from fedglmm.site import SiteConfig

    case = CASES["sim_pois_ward"]
    res = fit(case, site_config=SiteConfig(min_rows=0, min_cell=0, max_params_per_row=1.0, min_group=8))
    modes = res.ranef()
    held = res.withheld
    assert "ward:patient" in held and "ward" not in held
    assert modes["ward:patient"].loc[held["ward:patient"]].isna().all().all()
    assert not modes["ward"].isna().any().any()


@pytest.mark.parametrize("family", ["poisson", "binomial"])
def test_one_site_with_several_factors_checks_its_own_fit_in_one_round(family):
    """The only site fits its rows to convergence (two grouping factors, nested); the hybrid's first
    round checks that fit and is the last: 2 rounds in all (one-shot, final), and the iterative fit."""
    rng = np.random.default_rng(21)
    n_loc, per_loc, reps = 25, 6, 4
    loc = np.repeat(np.arange(n_loc), per_loc * reps)
    brood = np.repeat(np.arange(n_loc * per_loc), reps)
    x = rng.normal(size=len(loc))
    eta = -0.3 + 0.5 * x + rng.normal(0, 0.8, n_loc)[loc] + rng.normal(0, 0.5, n_loc * per_loc)[brood]
    y = rng.poisson(np.exp(eta)) if family == "poisson" else (rng.random(len(loc)) < 1 / (1 + np.exp(-eta)))
    df = pd.DataFrame({"y": y.astype(int), "x": x, "loc": [f"L{i}" for i in loc], "brood": [f"B{i}" for i in brood]})
    formula = "y ~ x + (1 | brood) + (1 | loc)"
    import fedglmm

    hyb = fedglmm.fit(formula, df, family=family)
    it = fedglmm.fit(formula, df, family=family, method="iterative")
    assert hyb.converged and hyb.rounds == 2, hyb.rounds
    assert np.allclose(hyb.fixef, it.fixef, atol=1e-8) and np.allclose(hyb.theta, it.theta, atol=1e-8)
    assert abs(hyb.loglik - it.loglik) < 1e-8 * abs(it.loglik)


@pytest.mark.parametrize("reml", [True, False])
def test_one_site_gaussian_with_crossed_factors_starts_at_its_own_fit(reml):
    """A gaussian model with crossed factors at one site: the site's own fit, by REML or ML as asked, is
    the start, and the rounds are the one-shot one, one check and the final one."""
    rng = np.random.default_rng(5)
    a, b = np.meshgrid(np.arange(20), np.arange(6), indexing="ij")
    a, b = a.ravel(), b.ravel()
    y = 20 + rng.normal(0, 0.8, 20)[a] + rng.normal(0, 2.0, 6)[b] + rng.normal(0, 0.5, len(a))
    df = pd.DataFrame({"y": y, "a": [f"a{i}" for i in a], "b": [f"b{i}" for i in b]})
    import fedglmm

    hyb = fedglmm.fit("y ~ 1 + (1 | a) + (1 | b)", df, reml=reml)
    it = fedglmm.fit("y ~ 1 + (1 | a) + (1 | b)", df, reml=reml, method="iterative")
    assert hyb.converged and hyb.rounds <= 3, hyb.rounds
    assert np.allclose(hyb.theta, it.theta, atol=1e-7) and abs(hyb.loglik - it.loglik) < 1e-8 * abs(it.loglik)


def test_one_site_with_a_factor_in_a_random_term_starts_from_its_exact_fit():
    """A factor inside a random term, (1 + f | b): the one-shot design has a Z column for every level of f,
    the site's own fit codes f against its first level as agreed.  The own fit's message named the
    one-shot design's Z columns, the coordinator found them not coded as agreed and went on from the site
    totals (7 rounds on this poisson, 12 on verbagg_dif); with the fit's own names the one site's exact fit
    is the start, and the first round confirms it (2 rounds), at the iterative method's fit."""
    rng = np.random.default_rng(4)
    n = 900
    a, b = rng.integers(0, 30, n), rng.integers(0, 12, n)
    f, x = rng.choice(["F", "M"], n), rng.normal(size=n)
    ua, ub, vb = rng.normal(0, 0.5, 30), rng.normal(0, 0.6, 12), rng.normal(0, 0.4, 12)
    eta = 0.3 + 0.4 * x + 0.3 * (f == "M") + ua[a] + ub[b] + vb[b] * (f == "M")
    df = pd.DataFrame({"y": rng.poisson(np.exp(eta)), "x": x, "f": f, "a": a, "b": b})
    formula = "y ~ x + f + (1 | a) + (1 + f | b)"
    hybrid = fedglmm.fit(formula, df, family="poisson")
    exact = fedglmm.fit(formula, df, family="poisson", method="iterative")
    assert hybrid.rounds == 2, hybrid.rounds
    assert abs(hybrid.loglik - exact.loglik) < 1e-8
    assert np.allclose(hybrid.fixef, exact.fixef, atol=1e-8) and np.allclose(hybrid.theta, exact.theta, atol=1e-7)


@pytest.mark.parametrize("name,by_first", [("grouseticks_nested", True), ("grouseticks_olre", True),
                                           ("mmmec_olre", False)])
def test_third_derivatives_at_a_rounds_points_end_a_split_fit_sooner(name, by_first):
    """Two or three nested factors over 3 sites: from a decrement of 1-4, the next round's most promising point
    comes with the sites' third derivatives (along the covariance parameters: site.own_third.reply_third);
    from there, a decrement of 0.015-0.025, the mean of the step to third order and Chebyshev's is the final
    candidate, which lands below the tolerance where Newton's left 5e-6 to 6e-5.  4 rounds, one fewer than
    without them (NewtonConfig.final_third off), at the estimates and logLik of the fit continued to machine
    precision, standard errors to 5e-7 (the information moved to the estimate by those third derivatives; a
    zero SD, grouseticks' LOCATION, stays exactly zero)."""
    from fedglmm.model.options import NewtonConfig

    case = next(c for c in cases() if c["name"] == name)
    data = split_sites(case, 3)
    if by_first:            # the golden file's split: LOCATION's codes in order of appearance, mod 3
        df = pd.concat(data.values(), ignore_index=True).sort_values("INDEX", ignore_index=True)
        codes = pd.factorize(df["LOCATION"])[0]
        data = {f"s{i}": df[codes % 3 == i].reset_index(drop=True) for i in range(3)}
    exact = fit(case, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    with_third, without = fit(case, data=data), fit(case, data=data, newton=NewtonConfig(final_third=False))
    assert with_third.converged and with_third.rounds == 4 and without.rounds == 5, (with_third.rounds, without.rounds)
    assert np.allclose(with_third.fixef, exact.fixef, rtol=0, atol=1e-8)
    assert np.allclose(with_third.theta, exact.theta, rtol=0, atol=1e-8)
    assert abs(with_third.loglik - exact.loglik) < 1e-8
    assert np.allclose(with_third.se, exact.se, rtol=5e-7, atol=0)
    assert np.array_equal(with_third.theta == 0, exact.theta == 0)


def _one_site_per(name: str, column: str):
    """The case split one site per level of ``column`` (as the reference's README splits it), fitted by the
    default method, and its iterative fit continued to machine precision."""
    from fedglmm.model.options import NewtonConfig

    case = next(c for c in cases() if c["name"] == name)
    df = pd.read_csv(case["data"])
    data = {str(k): part.reset_index(drop=True) for k, part in df.groupby(column, sort=False)}
    return fit(case, data=data), fit(case, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))


def _at_optimum(res, exact) -> None:
    assert np.allclose(res.fixef, exact.fixef, rtol=0, atol=1e-8)
    assert np.allclose(res.theta, exact.theta, rtol=0, atol=1e-8)
    assert abs(res.loglik - exact.loglik) < 1e-8


def test_third_derivatives_at_newtons_point_beside_the_most_promising():
    """cbpp_olre split as the reference's README splits it, one herd per site (15): from the start (decrement
    0.8) the round's most promising point is another model's and Newton's point is the one accepted (0.02);
    its third derivatives came beside (now asked at both), and the step to third order from there leaves
    2e-7: 5 rounds, one fewer, at the fit continued to machine precision."""
    res, exact = _one_site_per("cbpp_olre", "herd")
    assert res.converged and res.rounds <= 5, res.rounds
    _at_optimum(res, exact)


def test_cbpp_olre_over_three_sites_by_herd_in_four_rounds():
    """cbpp_olre over 3 sites, herds dealt by their codes: no other Newton step is beside the round's most promising
    point, and the next best brings the sites' third derivatives beside it; the steps to third order from there,
    in the SDs' squares (herd SD 0.10), make the final candidate, and the last step to third order ends the fit
    -- 4 rounds (5 before), at the fit continued to machine precision, standard errors to 1e-8."""
    from fedglmm.model.options import NewtonConfig

    case = CASES["cbpp_olre"]
    res = fit(case, data=split_sites(case, 3))
    exact = fit(case, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    assert res.converged and res.rounds <= 4, res.rounds
    _at_optimum(res, exact)
    assert np.allclose(res.se, exact.se, rtol=1e-8, atol=0)


def test_a_zero_sds_face_from_an_indefinite_start():
    """grouseticks' nested factors split one LOCATION per site (63 sites, as the reference's README splits
    them): the start's Hessian is indefinite along LOCATION's SD, whose optimum is 0.  The step onto that SD's
    zero with the others at their model's minimum there (boundary.face_step, now with several factors too)
    takes the fit from 4.5 above the optimum to 0.16, and the next along the face to 1e-3: 6 rounds (7 by the
    trust region's steps; 5 since the steps along the face count from its decrement, the next test), at the fit
    continued to machine precision, LOCATION's SD exactly 0."""
    res, exact = _one_site_per("grouseticks_nested", "LOCATION")
    assert res.converged and res.rounds <= 6, res.rounds
    _at_optimum(res, exact)
    assert np.array_equal(res.theta == 0, exact.theta == 0) and np.any(res.theta == 0)


def test_steps_along_a_zero_sds_face_converge_as_newtons_do():
    """The same split as above: the point reached on LOCATION's zero SD has H indefinite along that SD alone, so
    no Newton decrement; the steps along the face start from its decrement within the face (0.29), and the next
    point's (2.5e-3) then shows the contraction that makes its Newton step the final candidate, ending the fit
    there (1.6e-7, accepted by that contraction): 5 rounds (were 6), at the fit continued to machine precision,
    standard errors to 6.5e-8 (the round it saves had brought them to 3e-8), LOCATION's SD exactly 0."""
    res, exact = _one_site_per("grouseticks_nested", "LOCATION")
    assert res.converged and res.rounds <= 5, res.rounds
    _at_optimum(res, exact)
    assert np.allclose(res.se, exact.se, rtol=1e-6, atol=0)
    assert np.array_equal(res.theta == 0, exact.theta == 0) and np.any(res.theta == 0)


def test_fixed_effects_step_with_theta_held_while_h_is_indefinite():
    """Draw 1 of benchmarks/nested_sites_rounds.py (poisson, a random slope in time by patient, six hospitals
    over two sites): the start's intercept is 0.73 below its optimum and H is indefinite along the hospitals'
    SD (with the intercept), so the trust region's steps bounded every coordinate's move for 8 rounds; the
    fixed effects' own Newton step with θ held (start_choice.held_step) is one more candidate there, and after it H
    is positive definite: 6 rounds (were 12), at the fit continued to machine precision."""
    import fedglmm
    from fedglmm.model.options import NewtonConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from nested_sites_rounds import draw

    shape, formula, sites = draw(1)
    assert shape["family"] == "poisson" and shape["slope"] and shape["sites"] * shape["hosp/site"] == 6
    res = fedglmm.fit(formula, sites, family="poisson")
    exact = fedglmm.fit(formula, sites, family="poisson", method="iterative",
                        newton=NewtonConfig(tol=1e-16, near=1e-6))
    assert res.converged and res.rounds <= 6, res.rounds
    _at_optimum(res, exact)
