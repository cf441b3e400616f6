"""The one-shot method's pseudo-data generator: rows whose moment sums up to order K match the targets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedglmm.coordinator.pseudo import PseudoDataWarning, generate_group, generate_order2, solver
from fedglmm.coordinator.pseudo.solver import _generate_group
from fedglmm.model.moments import moment_sums, monomials, relative_errors


def make_data(n, d, seed, dummy=True):
    """Binary logistic outcome; normal, uniform, 0/1 dummy and further normal/uniform covariates."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    u = rng.uniform(-1, 1, n)
    z = rng.binomial(1, 0.35, n).astype(float) if dummy else rng.normal(size=n)
    cols = [x, u, z]
    j = 0
    while len(cols) < d - 1:
        cols.append(rng.normal(1, 2, n) if j % 2 == 0 else rng.uniform(0, 3, n))
        j += 1
    eta = -0.2 + 0.8 * x - 0.5 * u + 0.7 * z
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
    return np.column_stack([y] + cols[:d - 1])


def run(X, K, binary=(0,), nonneg=(), seed=0, **kw):
    expo = monomials(X.shape[1], K)
    t = moment_sums(X, expo)
    V, err, info = _generate_group(X.shape[0], expo, t, binary, nonneg, np.random.default_rng(seed),
                                   kw.get("tol", 1e-9), kw.get("max_tries", 6), kw.get("max_iter", 200))
    return V, err, info, expo, t


def nearest_row_distance(V, X):
    """For each pseudo row, the distance (max over columns, in SDs of X) to the nearest real row."""
    sd = X.std(axis=0)
    sd[sd == 0] = 1.0
    D = np.abs(V[:, None, :] - X[None, :, :]) / sd
    return D.max(axis=2).min(axis=1)


def plain_rel(S, t, floor):
    """|S − t| / |t| over the monomials whose |t| is not tiny."""
    big = np.abs(t) > floor
    return float(np.max(np.abs(S - t)[big] / np.abs(t[big])))


# ---------------------------------------------------------------------------------------------------------
# monomials and sums
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize("K", [0, 1, 2, 3, 4])
def test_monomials_count_order_and_uniqueness(d, K):
    E = monomials(d, K)
    assert E.shape == (math.comb(d + K, K), d) and E.dtype.kind == "i"
    deg = E.sum(axis=1)
    assert np.all(np.diff(deg) >= 0) and (E.size == 0 or deg[0] == 0)
    assert len({tuple(r) for r in E}) == len(E)
    for k in range(K + 1):                        # within a degree: descending lexicographic exponents
        block = [tuple(r) for r in E[deg == k]]
        assert block == sorted(block, reverse=True)
        assert len(block) == math.comb(d + k - 1, k) if d else len(block) == (k == 0)


def test_monomials_documented_example():
    got = [tuple(r) for r in monomials(3, 2)]
    assert got == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (1, 1, 0), (1, 0, 1),
                   (0, 2, 0), (0, 1, 1), (0, 0, 2)]


def test_moment_sums_matches_naive_loop():
    rng = np.random.default_rng(1)
    V = rng.normal(size=(9, 3)) * [1, 2, 0.5] + [0, 1, -1]
    V[2, 1] = 0.0
    E = monomials(3, 4)
    naive = np.array([sum(np.prod([V[i, k] ** e[k] for k in range(3)]) for i in range(9)) for e in E])
    np.testing.assert_allclose(moment_sums(V, E), naive, rtol=1e-13, atol=1e-13)
    big = rng.normal(size=(10_000, 2))                         # more rows than one block
    np.testing.assert_allclose(moment_sums(big, monomials(2, 2)),
                               [10_000, *big.sum(0), (big[:, 0] ** 2).sum(), (big[:, 0] * big[:, 1]).sum(),
                                (big[:, 1] ** 2).sum()], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# K = 2: closed form
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", ["small", 500])
def test_k2_exact_real_outcome(n):
    d = 5
    n = d + 2 if n == "small" else n
    rng = np.random.default_rng(3)
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) * 5
    expo = monomials(d, 2)
    t = moment_sums(X, expo)
    V, err = generate_group(n, expo, t, rng=np.random.default_rng(0))
    assert V.shape == (n, d) and err <= 1e-10
    assert plain_rel(moment_sums(V, expo), t, 1e-8 * n) <= 1e-10
    assert np.max(relative_errors(V, expo, t)) <= 1e-10


@pytest.mark.parametrize("n", ["small", 500])
def test_k2_exact_binary_outcome(n):
    d = 5
    n = d + 2 if n == "small" else n
    X = make_data(n, d, seed=4)
    expo = monomials(d, 2)
    t = moment_sums(X, expo)
    V, err = generate_group(n, expo, t, binary=[0], rng=np.random.default_rng(0))
    assert err <= 1e-10
    y = V[:, 0]
    assert set(np.unique(y)) <= {0.0, 1.0} and y.sum() == X[:, 0].sum()
    np.testing.assert_allclose(y @ V[:, 1:], X[:, 0] @ X[:, 1:], rtol=1e-10, atol=1e-10 * n)
    np.testing.assert_allclose(V.T @ V, X.T @ X, rtol=1e-10, atol=1e-10 * n)
    np.testing.assert_allclose(V.sum(0), X.sum(0), rtol=1e-10, atol=1e-10 * n)


# ---------------------------------------------------------------------------------------------------------
# K = 3, 4: least squares
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,K,n", [(4, 3, 30), (4, 4, 30), (4, 4, 200), (6, 3, 30), (6, 3, 200),
                                   (6, 4, 60), (6, 4, 200)])
@pytest.mark.parametrize("declare_dummy", [False, True])
def test_higher_order_moments_matched_not_copied(d, K, n, declare_dummy):
    X = make_data(n, d, seed=10 * d + K + n)
    V, err, info, expo, t = run(X, K, binary=(0, 3) if declare_dummy else (0,))
    assert not info["over_determined"]
    assert err <= 1e-6, info
    assert np.max(relative_errors(V, expo, t, binary=[0, 3])) <= 1e-6
    # binaries exact: the outcome, and the dummy (declared, or found by the K = 4 moments)
    assert set(np.unique(V[:, 0])) <= {0.0, 1.0} and V[:, 0].sum() == X[:, 0].sum()
    if declare_dummy or K >= 4:
        assert set(np.unique(V[:, 3])) <= {0.0, 1.0} and V[:, 3].sum() == X[:, 3].sum()
    # not a copy of the data: pseudo rows are far from every real row
    assert np.median(nearest_row_distance(V, X)) > 0.02
    # only K moments are used: degree K + 1 moments (involving a real variable) differ
    E1 = monomials(d, K + 1)
    top = (E1.sum(axis=1) == K + 1) & (E1[:, [1, 2] + list(range(4, d))] > 0).any(axis=1)
    e1 = relative_errors(V, E1[top], moment_sums(X, E1[top]), binary=[0, 3])
    assert np.max(e1) > 1e-2


@pytest.mark.parametrize("d,K", [(4, 3), (4, 4), (6, 3), (6, 4)])
def test_small_groups_report_honestly(d, K):
    """n = 12: reported error is the recomputed one; when there are fewer unknowns than moment equations
    and the match is exact, the 'pseudo' rows are the real rows -- the moments disclose the group."""
    X = make_data(12, d, seed=5)
    V, err, info, expo, t = run(X, K)
    assert err == pytest.approx(np.max(relative_errors(V, expo, t, binary=info["binary"])), rel=1e-6, abs=1e-15)
    if info["over_determined"] and err <= 1e-9:
        assert np.max(nearest_row_distance(V, X)) < 1e-6
    else:
        assert err <= 1e-6


def test_over_determined_group_reproduces_the_real_rows():
    X = make_data(12, 4, seed=5)
    V, err, info, _, _ = run(X, 4)
    assert info["over_determined"] and info["unknowns"] < info["equations"]
    assert err <= 1e-9
    assert np.max(nearest_row_distance(V, X)) < 1e-8


# ---------------------------------------------------------------------------------------------------------
# binary, nonneg, structure
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K,p", [(2, 3), (3, 2), (2, 4), (4, 3)])
def test_binary_variables_exact_with_their_joint_counts(K, p):
    rng = np.random.default_rng(7)
    n = 80
    B = (rng.uniform(size=(n, p)) < rng.uniform(0.2, 0.7, p)).astype(float)
    x = rng.normal(size=n) + B[:, 0] - B[:, 1]
    X = np.column_stack([B, x])
    V, err, info, expo, t = run(X, K, binary=tuple(range(p)))
    assert err <= 1e-9 and info["binary"] == list(range(p))
    U = V[:, :p]
    assert set(np.unique(U)) <= {0.0, 1.0}
    np.testing.assert_array_equal(U.sum(0), B.sum(0))
    np.testing.assert_array_equal(U.T @ U, B.T @ B)              # pairwise joint counts


def test_too_many_binaries_are_matched_as_real(monkeypatch):
    monkeypatch.setattr(solver, "MAX_BINARY", 2)
    X = make_data(60, 5, seed=8)
    X[:, 2] = (X[:, 2] > 0).astype(float)
    expo = monomials(5, 2)
    t = moment_sums(X, expo)
    with pytest.warns(PseudoDataWarning, match=r"\[2\]"):
        V, err = generate_group(60, expo, t, binary=[0, 3, 2], rng=np.random.default_rng(0))
    assert err <= 1e-10
    assert set(np.unique(V[:, [0, 3]])) <= {0.0, 1.0}


@pytest.mark.parametrize("K", [2, 3, 4])
def test_nonneg_count_outcome(K):
    rng = np.random.default_rng(11)
    n = 60
    x, w = rng.normal(size=n), rng.exponential(size=n)
    y = rng.poisson(np.exp(-0.3 + 0.6 * x)).astype(float)
    X = np.column_stack([y, x, w])
    expo = monomials(3, K)
    t = moment_sums(X, expo)
    V, err = generate_group(n, expo, t, nonneg=[0, 2], rng=np.random.default_rng(0))
    assert err <= 1e-8
    assert V[:, 0].min() >= 0 and V[:, 2].min() >= 0


def test_k4_keeps_dummies_squares_interactions_and_constants():
    """With K = 4 the moments force a 0/1 column to be 0/1, age2 to be age², x·z to be the product and a
    constant to be constant; the generator recognises these and keeps them exactly."""
    rng = np.random.default_rng(12)
    n = 200
    age = rng.normal(50, 10, n)
    x = rng.normal(size=n)
    z = rng.binomial(1, 0.4, n).astype(float)
    dose = np.where(rng.uniform(size=n) < 0.5, 10.0, 20.0)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(x + z - 0.02 * (age - 50))))).astype(float)
    X = np.column_stack([y, age, x, z, age ** 2, x * z, np.full(n, 3.5), dose])
    V, err, info, expo, t = run(X, 4)
    assert err <= 1e-6
    assert info["binary_detected"] == [3, 7] and info["constant"] == [6] and sorted(info["derived"]) == [4, 5]
    assert set(np.unique(V[:, 3])) == {0.0, 1.0}
    assert set(np.unique(V[:, 7])) == {10.0, 20.0}
    np.testing.assert_allclose(V[:, 4], V[:, 1] ** 2, rtol=1e-8)
    np.testing.assert_allclose(V[:, 5], V[:, 2] * V[:, 3], atol=1e-8)
    assert np.all(V[:, 6] == 3.5)


def test_subset_of_monomials_and_edge_groups():
    X = make_data(50, 4, seed=14)
    expo = np.vstack([monomials(4, 2), [[1, 1, 1, 0], [1, 0, 0, 3], [0, 0, 4, 0]]])    # not closed
    t = moment_sums(X, expo)
    V, err = generate_group(50, expo, t, binary=[0], rng=np.random.default_rng(0))
    assert err <= 1e-9
    expo4 = monomials(4, 4)
    V0, err0 = generate_group(0, expo4, np.zeros(len(expo4)), rng=np.random.default_rng(0))
    assert V0.shape == (0, 4) and err0 == 0.0
    V1, err1 = generate_group(1, expo4, moment_sums(X[:1], expo4), binary=[0], rng=np.random.default_rng(0))
    np.testing.assert_allclose(V1, X[:1], rtol=1e-12)
    assert err1 <= 1e-12


def test_input_validation():
    expo = monomials(3, 3)
    t = np.ones(len(expo))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="degree ≤ 2"):
        generate_group(5, expo[expo.sum(1) != 2], t[expo.sum(1) != 2], rng=rng)
    with pytest.raises(ValueError, match="length"):
        generate_group(5, expo, t[:-1], rng=rng)
    with pytest.raises(ValueError, match="out of range"):
        generate_group(5, expo, t, binary=[3], rng=rng)
    with pytest.raises(ValueError, match="repeated"):
        generate_group(5, np.vstack([expo, expo[:1]]), np.ones(len(expo) + 1), rng=rng)


# ---------------------------------------------------------------------------------------------------------
# several groups
# ---------------------------------------------------------------------------------------------------------

def test_generate_group_is_a_function_of_its_stream():
    """Each group draws only from the stream it is given: the same stream gives the same rows bit for bit
    whatever was generated before, another stream other rows with the same match."""
    expo = monomials(4, 3)
    data = [make_data(n, 4, seed=20 + n) for n in (25, 40, 60)]
    targets = [moment_sums(X, expo) for X in data]

    def gen(i, seed):
        return generate_group(len(data[i]), expo, targets[i], binary=[0], rng=np.random.default_rng([seed, i]))

    first = [gen(i, 7) for i in range(3)]
    for i, (V, err) in enumerate(first):
        assert V.shape == data[i].shape and err <= 1e-8
        assert err == np.max(relative_errors(V, expo, targets[i], binary=[0]))
    for i in (2, 0, 1):                                   # in another order: the same rows
        V, err = gen(i, 7)
        assert np.array_equal(V, first[i][0]) and err == first[i][1]
    V8, err8 = gen(0, 8)
    assert not np.allclose(V8, first[0][0]) and err8 <= 1e-8


def test_order2_batch_stacks_groups_deterministically():
    n, T, expo = _groups(5)
    V, gi, err = generate_order2(n, T, expo, binary_first=True, rng=np.random.default_rng(7))
    assert np.array_equal(gi, np.repeat(np.arange(len(n)), n))           # the groups in the order given
    assert len(err) == len(n) and np.max(err) < 1e-9
    V2, gi2, err2 = generate_order2(n, T, expo, binary_first=True, rng=np.random.default_rng(7))
    assert np.array_equal(V, V2) and np.array_equal(gi, gi2) and np.array_equal(err, err2)
    V3, _, err3 = generate_order2(n, T, expo, binary_first=True, rng=np.random.default_rng(8))
    assert not np.allclose(V, V3) and np.max(err3) < 1e-9


# ---------------------------------------------------------------------------------------------------------
# downstream: a logistic regression on the pseudo data
# ---------------------------------------------------------------------------------------------------------

def logistic_fit(X, y):
    """Newton-Raphson for y ~ 1 + X (binomial, logit): coefficients and standard errors."""
    A = np.column_stack([np.ones(len(y)), X])
    b = np.zeros(A.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-A @ b))
        H = A.T @ (A * (p * (1 - p))[:, None])
        step = np.linalg.solve(H, A.T @ (y - p))
        b += step
        if np.max(np.abs(step)) < 1e-12:
            break
    p = 1 / (1 + np.exp(-A @ b))
    H = A.T @ (A * (p * (1 - p))[:, None])
    return b, np.sqrt(np.diag(np.linalg.inv(H)))


def real_looking_data(seed, n=300):
    rng = np.random.default_rng(seed)
    age = rng.normal(50, 10, n)
    bmi = rng.gamma(8, 3.5, n)
    sex = rng.binomial(1, 0.5, n).astype(float)
    u = rng.uniform(0, 1, n)
    eta = -4 + 0.06 * age + 0.05 * (bmi - 28) + 0.6 * sex - 1.0 * u
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
    return np.column_stack([y, age, bmi, sex, u])


def glm_discrepancy(seed, K):
    """max_j |β̂_j(pseudo) − β̂_j(real)| / SE_j(real) for a logistic regression on 4 covariates."""
    X = real_looking_data(seed)
    b0, se = logistic_fit(X[:, 1:], X[:, 0])
    expo = monomials(5, K)
    V, err = generate_group(len(X), expo, moment_sums(X, expo), binary=[0], rng=np.random.default_rng(seed))
    assert err <= 1e-8
    b, _ = logistic_fit(V[:, 1:], V[:, 0])
    return float(np.max(np.abs(b - b0) / se))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_regression_on_k4_pseudo_data_is_close_to_the_real_fit(seed):
    gaps = {K: glm_discrepancy(seed, K) for K in (2, 3, 4)}
    assert gaps[4] <= 0.2, gaps


# ---------------------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------------------

def test_200_rows_8_variables_k4_matched():
    """495 moments of 8 variables for 200 rows (timing belongs to benchmarks, not tests)."""
    rng = np.random.default_rng(30)
    n = 200
    X = np.column_stack([rng.binomial(1, 0.4, n), rng.normal(size=(n, 4)), rng.uniform(size=(n, 2)),
                         rng.gamma(2.0, size=n)])
    expo = monomials(8, 4)
    t = moment_sums(X, expo)
    V, err = generate_group(n, expo, t, binary=[0], rng=np.random.default_rng(0))
    assert err <= 1e-9
    assert set(np.unique(V[:, 0])) <= {0.0, 1.0} and V[:, 0].sum() == X[:, 0].sum()


# --- the batched order-2 generator -------------------------------------------------------------------

def _groups(seed, G=40, binary=True):
    rng = np.random.default_rng(seed)
    n = rng.integers(4, 60, G)
    n[:3] = [3, 4, 5]                       # too few rows for the batch: served one by one
    expo = monomials(4, 2)
    T = []
    for g in range(G):
        V = np.column_stack([rng.binomial(1, 0.3, n[g]) if binary else rng.poisson(0.7, n[g]),
                             rng.normal(size=n[g]), np.full(n[g], rng.normal()),   # a group-level column
                             rng.uniform(0, 5, n[g])])
        T.append(moment_sums(V, expo))
    return n, np.array(T), expo


@pytest.mark.parametrize("binary", [True, False])
def test_order2_batch_matches_every_group_exactly(binary):
    n, T, expo = _groups(3, binary=binary)
    V, gi, err = generate_order2(n, T, expo, binary_first=binary, nonneg_first=not binary,
                                 rng=np.random.default_rng(0))
    assert V.shape == (n.sum(), 4) and np.array_equal(np.bincount(gi), n)
    for g in range(len(n)):
        rows = V[gi == g]
        e = relative_errors(rows, expo, T[g], binary=[0] if binary else [])
        assert e.max() < 1e-9 and err[g] < 1e-9, (g, e.max(), err[g])
        assert np.ptp(rows[:, 2]) < 1e-9 * max(1.0, abs(rows[0, 2]))     # the group-level column stays constant
        if binary:
            assert set(np.unique(rows[:, 0])) <= {0.0, 1.0} and rows[:, 0].sum() == round(T[g][1])
        else:
            assert rows[:, 0].min() >= 0.0


def test_order2_start_draws_again_instead_of_solving_each_group(monkeypatch):
    """For a start (``exact=False``), low counts whose closed-form draw goes negative are drawn again in a
    batch (and at last clipped), never solved group by group: the counts stay ≥ 0, groups served by a redraw
    match their moments exactly, the rest are close; with ``exact=True`` every group still matches."""
    n, T, expo = _groups(5, binary=False)
    calls = []
    monkeypatch.setattr("fedglmm.coordinator.pseudo.order2.generate_group",
                        lambda *a, **k: calls.append(a[0]) or generate_group(*a, **k))
    V, gi, err = generate_order2(n, T, expo, nonneg_first=True, rng=np.random.default_rng(0), exact=False)
    assert V[:, 0].min() >= 0.0 and np.array_equal(np.bincount(gi), n)
    assert calls and max(calls) <= 5                       # only the groups too small for the batch
    assert np.all(np.isnan(err))                            # a start's draw does not compute its errors ...
    from fedglmm.coordinator.pseudo.order2 import _group_errors
    err = _group_errors(V, gi, n, expo, T, False)           # ... which are, when asked for
    assert np.mean(err < 1e-9) > 0.5 and np.all(err[n >= 10] < 0.5)
    calls.clear()
    _, _, err_exact = generate_order2(n, T, expo, nonneg_first=True, rng=np.random.default_rng(0))
    assert np.max(err_exact) < 1e-9 and len(calls) > 3       # exactness needs the group-by-group solver


@pytest.mark.parametrize("binary,exact", [(True, True), (False, True), (False, False)])
def test_order2_sites_in_one_batch_draw_each_site_rows_as_alone(binary, exact):
    """Several sites' groups in one call (one generator per site): each site's rows are bit for bit those
    of a call for that site alone -- its normal and gamma draws, redraws and group-by-group fallbacks all
    come from its own stream in the same order."""
    sites = [_groups(s, binary=binary) for s in (11, 12, 13)]
    expo = sites[0][2]
    alone = [generate_order2(n, T, expo, binary_first=binary, nonneg_first=not binary,
                             rng=np.random.default_rng(s), exact=exact) for s, (n, T, _) in enumerate(sites)]
    n = np.concatenate([s[0] for s in sites])
    T = np.concatenate([s[1] for s in sites])
    which = np.repeat(np.arange(3), [len(s[0]) for s in sites])
    V, gi, err = generate_order2(n, T, expo, binary_first=binary, nonneg_first=not binary,
                                 rng=[np.random.default_rng(s) for s in range(3)], exact=exact, sites=which)
    assert np.array_equal(V, np.vstack([a[0] for a in alone]))
    off = np.r_[0, np.cumsum([len(s[0]) for s in sites])[:-1]]
    assert np.array_equal(gi, np.concatenate([a[1] + o for a, o in zip(alone, off)]))
    assert np.array_equal(err, np.concatenate([a[2] for a in alone]), equal_nan=True)


def test_pseudo_designs_of_many_sites_are_each_site_alone():
    """The stand-ins' pseudo rows drawn for all sites at once (the hybrid at 100 sites) equal those drawn
    site by site, for each family's outcome and with the hybrid's compression."""
    from fedglmm.coordinator.virtual import pseudo_design, pseudo_designs
    from fedglmm.model.families import get_family

    rng = np.random.default_rng(5)
    names, znames = ["Intercept", "x1", "x2"], ["Intercept"]
    mask = np.ones((1, 1), bool)
    expo = monomials(3, 2)
    for fam, compress in (("binomial", 4.0), ("binomial", 1.0), ("poisson", 4.0), ("poisson", 1.0), ("gamma", 1.0)):
        blocks = {}
        for s in range(4):
            G = int(rng.integers(2, 9))
            sizes = rng.integers(3, 40, G)
            mom, levels = [], [f"g{s}_{j}" for j in range(G)]
            for m in sizes:
                x1, x2 = rng.normal(1.0, 2.0, m), rng.uniform(0, 3, m)
                y = rng.binomial(1, 0.4, m) if fam == "binomial" else rng.poisson(1.2, m) + (fam == "gamma") * 0.5
                mom.append(moment_sums(np.column_stack([y, x1, x2]), expo))
            blocks[f"s{s}"] = {"variables": ["(outcome)", "x1", "x2"], "moments": np.array(mom), "n": sizes,
                               "levels": levels}
        family = get_family(fam)
        many = pseudo_designs(blocks, names, znames, mask, family, 3, compress)
        for sid, b in blocks.items():
            d1, g1 = pseudo_design(b, names, znames, mask, family, 3, compress)
            d2, g2 = many[sid]
            for f in ("y", "trials", "X", "Z", "group", "offset"):
                assert np.array_equal(getattr(d1, f), getattr(d2, f)), (fam, compress, sid, f)
            assert d1.group_levels == d2.group_levels
            np.testing.assert_array_equal(g1["per_group"], g2["per_group"])


def test_hybrid_pseudo_rows_of_groups_with_many_trials_are_capped():
    """A binomial group of n Bernoulli observations gets min(max(⌈n/4⌉, min(n, 25)), 100) compressed pseudo
    rows, each standing for n/m of them (its trials): cbind rows with 1e5 trials each once made 3e7 rows for
    1200 data rows and ran the machine out of memory.  The trials add up to the group's size, the ones to
    its count up to one row's trials."""
    from fedglmm.coordinator.virtual import pseudo_designs
    from fedglmm.model.families import get_family

    rng = np.random.default_rng(2)
    expo = monomials(2, 2)
    n = np.array([400.0, 401.0, 8e5, 30.0])
    mom = []
    for k in n:
        ones = round(0.3 * k)
        x1 = rng.normal(size=4)
        # moments of k Bernoulli rows: `ones` at x = x1[0..1] (half each), the rest at x1[2..3]
        xs = np.r_[np.full(ones // 2, x1[0]), np.full(ones - ones // 2, x1[1]),
                   np.full((int(k) - ones) // 2, x1[2]), np.full(int(k) - ones - (int(k) - ones) // 2, x1[3])]
        ys = np.r_[np.ones(ones), np.zeros(int(k) - ones)]
        mom.append(moment_sums(np.column_stack([ys, xs]), expo))
    block = {"variables": ["(outcome)", "x1"], "moments": np.array(mom), "n": n, "levels": ["a", "b", "c", "d"]}
    d, _ = pseudo_designs({"s": block}, ["Intercept", "x1"], ["Intercept"], np.ones((1, 1), bool),
                          get_family("binomial"), 0, 4.0)["s"]
    rows = np.bincount(d.group)
    assert rows.tolist() == [100, 100, 100, 25]
    assert np.allclose(np.bincount(d.group, d.trials), n)
    # the ones, up to one pseudo row's trials (the documented rounding of the compression)
    assert np.all(np.abs(np.bincount(d.group, d.y) - [m[1] for m in mom]) <= n / rows + 1e-9)
    assert np.allclose(np.bincount(d.group, d.trials * d.X[:, 1]), [m[2] for m in mom], rtol=0.05)


def test_hybrid_fits_binomial_rows_of_many_trials():
    """cbind rows of 5e4-1e5 trials (aggregated counts) over 3 sites: the default method fits them (its
    pseudo rows capped) in at most 4 rounds, at the iterative method's estimates."""
    import fedglmm
    from simulated import binomial_many_trials

    sites = binomial_many_trials(50_000, 100_000)[1]
    hyb, it = (fedglmm.fit("cbind(y, f) ~ x + (1 | g)", sites, family="binomial", method=k)
               for k in ("hybrid", "iterative"))
    assert hyb.converged and hyb.rounds <= 4
    assert np.allclose(hyb.fixef, it.fixef, rtol=0, atol=1e-8) and abs(hyb.theta[0] - it.theta[0]) < 1e-8


def test_oneshot_refuses_pseudo_data_beyond_memory_in_one_line():
    """The one-shot method draws one pseudo row per binomial trial: cbind rows of 5e4-1e5 trials ask for 9e7
    rows, which ran out of memory; the fit now stops with one line naming the count and the way out."""
    import pandas as pd

    import fedglmm

    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(60), 20)
    m = rng.integers(50_000, 100_000, len(g))
    y = rng.binomial(m, 0.4)
    df = pd.DataFrame({"y": y, "f": m - y, "x": rng.normal(size=len(g)), "g": g})
    sites = {f"s{i}": df[g % 3 == i].reset_index(drop=True) for i in range(3)}
    with pytest.raises(fedglmm.FedGLMMError, match=r"would hold [\d,]+ rows \(one per binomial trial\).*hybrid"):
        fedglmm.fit("cbind(y, f) ~ x + (1 | g)", sites, family="binomial", method="oneshot")


def _factor_groups(seed: int, G: int = 40, levels: int = 5, zero_level: bool = True):
    """Groups of a count outcome, a factor's treatment-coded 0/1 columns (each level in every group, a few
    rows each), a continuous covariate and a group-level 0/1 column; in every group one level whose counts
    are all 0 (zero_level)."""
    rng = np.random.default_rng(seed)
    expo = monomials(1 + (levels - 1) + 2, 2)
    n, T, rows = [], [], []
    for g in range(G):
        lev = np.repeat(np.arange(levels), rng.integers(2, 6, levels))
        D = (lev[:, None] == np.arange(1, levels)[None, :]).astype(float)
        x = rng.normal(size=len(lev))
        mu = np.exp(0.3 + 0.8 * (lev == 2) - 1.5 * (lev == 3) + 0.4 * x + rng.normal(0, 0.7))
        y = rng.negative_binomial(2, 2 / (2 + mu)).astype(float)
        if zero_level:
            y[lev == 4] = 0.0
        V = np.column_stack([y, D, x, np.full(len(lev), float(g % 2))])
        n.append(len(lev))
        T.append(moment_sums(V, expo))
        rows.append(V)
    return np.array(n), np.array(T), expo, rows


@pytest.mark.parametrize("exact", [True, False])
def test_order2_keeps_a_factor_exact_beside_a_count(exact):
    """A count outcome beside a factor's 0/1 columns: the pseudo rows hold the factor exactly (each row one
    level, each level's size and outcome total those of the data), the outcome is ≥ 0 and 0 throughout a
    level whose counts are all 0, and every order-2 moment matches (exact) -- so a poisson likelihood of
    the level effects is that of the data."""
    from fedglmm.coordinator.pseudo.order2 import _group_errors
    n, T, expo, rows = _factor_groups(3)
    V, gi, err = generate_order2(n, T, expo, nonneg_first=True, rng=np.random.default_rng(1), exact=exact,
                                 levels=[1, 2, 3, 4])
    err = _group_errors(V, gi, n, expo, T, False)
    assert np.array_equal(np.bincount(gi), n) and V[:, 0].min() >= 0.0
    D = V[:, 1:5]
    assert set(np.unique(D)) <= {0.0, 1.0} and D.sum(axis=1).max() == 1.0

    def level(R):
        return np.where(R[:, 1:5].any(axis=1), R[:, 1:5].argmax(axis=1) + 1, 0)

    for g, real in enumerate(rows):
        got = V[gi == g]
        mine, theirs = level(got), level(real)
        assert np.array_equal(np.bincount(mine, minlength=5), np.bincount(theirs, minlength=5))
        assert np.all(np.abs(got[mine == 4, 0]) <= 1e-9)
        if err[g] < 1e-9:
            tot = np.bincount(mine, weights=got[:, 0], minlength=5)
            assert np.allclose(tot, np.bincount(theirs, weights=real[:, 0], minlength=5), rtol=0, atol=1e-8)
    assert np.mean(err < 1e-9) >= 0.9, np.mean(err < 1e-9)


def test_order2_levels_only_where_the_sums_bear_them_out():
    """The columns named as one factor's levels are cells only where every group's sums show them 0/1 and
    exclusive, and there are two or more; else the draw is as it was (the columns matched as real ones)."""
    from fedglmm.coordinator.pseudo.order2 import _factor_block
    from fedglmm.coordinator.virtual import factor_levels
    n, T, expo, _ = _factor_groups(4, G=6, zero_level=False)
    d = expo.shape[1]
    idx = {tuple(r): m for m, r in enumerate(expo)}
    S1 = T[:, [idx[tuple(np.eye(d, dtype=int)[k])] for k in range(d)]]
    S2 = T[:, [[idx[tuple(np.eye(d, dtype=int)[j] + np.eye(d, dtype=int)[k])] for k in range(d)] for j in range(d)]]
    assert _factor_block(n, S1, S2, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert _factor_block(n, S1, S2, [1]) == []                  # one 0/1 column (two levels): drawn as real
    assert _factor_block(n, S1, S2, [1, 2, 3, 4, 6]) == []      # the group-level 0/1 column is 1 beside them
    assert _factor_block(n, S1, S2, [1, 5]) == []               # a real column
    S2[:, 1, 2] = S2[:, 2, 1] = 1.0                              # levels 1 and 2 together in a row
    assert _factor_block(n, S1, S2, [1, 2, 3, 4]) == []
    names = ["(outcome)", "spp[T.DF]", "spp[T.DM]", "mined[T.yes]", "x", "spp[T.DF]:x", "C(p, Sum)[S.2]"]
    assert factor_levels(names) == [1, 2] and factor_levels(names[:2] + names[3:]) == []
    expected = generate_order2(n, T, expo, nonneg_first=True, rng=np.random.default_rng(3))
    for wrong in ([1], [1, 5]):
        got = generate_order2(n, T, expo, nonneg_first=True, rng=np.random.default_rng(3), levels=wrong)
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, expected))


def test_order2_keeps_a_factor_exact_beside_a_binary_outcome():
    """A 0/1 outcome beside a factor's 0/1 columns and a real covariate: each group's table of outcome by
    level is the data's, the levels are exclusive, and every order-2 moment matches -- the real column's
    means by (outcome, level) cell taken additive, which the moments allow."""
    from fedglmm.coordinator.pseudo.order2 import _group_errors
    rng = np.random.default_rng(6)
    expo = monomials(5, 2)
    n, T, rows = [], [], []
    for g in range(25):
        lev = rng.integers(0, 4, int(rng.integers(30, 80)))
        x = rng.normal(size=len(lev)) + 0.5 * lev
        y = rng.binomial(1, 1 / (1 + np.exp(-(-0.5 + 0.7 * (lev == 2) - 1.0 * (lev == 3) + 0.5 * x))))
        V = np.column_stack([y, lev == 1, lev == 2, lev == 3, x]).astype(float)
        n.append(len(lev))
        T.append(moment_sums(V, expo))
        rows.append(V)
    n, T = np.array(n), np.array(T)
    V, gi, err = generate_order2(n, T, expo, binary_first=True, rng=np.random.default_rng(2), levels=[1, 2, 3])
    assert np.max(_group_errors(V, gi, n, expo, T, True)) < 1e-9 and np.max(err) < 1e-9
    assert set(np.unique(V[:, :4])) <= {0.0, 1.0} and V[:, 1:4].sum(axis=1).max() == 1.0

    def table(R):
        lev = np.where(R[:, 1:4].any(axis=1), R[:, 1:4].argmax(axis=1) + 1, 0)
        return np.bincount(lev * 2 + R[:, 0].astype(int), minlength=8)

    for g, real in enumerate(rows):
        assert np.array_equal(table(V[gi == g]), table(real))


def test_order2_factor_levels_of_compressed_groups_stay_whole():
    """The hybrid's compressed binomial groups (m rows standing for n/m observations each: their sums are
    not whole): the level sizes are apportioned to the m rows, so the factor stays 0/1 and exclusive in
    every group (rounding each level's size alone could exceed m and drop the factor for all groups)."""
    from fedglmm.coordinator.pseudo.order2 import _apportion
    rng = np.random.default_rng(11)
    expo = monomials(5, 2)
    n, T = [], []
    for g in range(40):
        lev = rng.integers(0, 4, int(rng.integers(26, 90)))
        if g == 7:                              # 30 rows as 25: levels of 7.5, 7.5 and 10 rows, none of 0
            lev = np.repeat([1, 2, 3], [9, 9, 12])
        y = rng.binomial(1, 0.4, len(lev))
        V = np.column_stack([y, lev == 1, lev == 2, lev == 3, rng.normal(size=len(lev))]).astype(float)
        n.append(len(lev))
        T.append(moment_sums(V, expo))
    n, T = np.array(n, float), np.array(T)
    m = np.minimum(np.maximum(np.ceil(n / 4.0), 25), 100)
    w = n / m
    V, gi, _ = generate_order2(m, T / w[:, None], expo, binary_first=True, rng=np.random.default_rng(0),
                               exact=False, levels=[1, 2, 3])
    assert set(np.unique(V[:, :4])) <= {0.0, 1.0} and V[:, 1:4].sum(axis=1).max() == 1.0
    assert np.array_equal(np.bincount(gi), m.astype(int))
    idx = {tuple(r): k for k, r in enumerate(expo)}
    for g in range(len(n)):                     # each level's rows within one of its share of the m rows
        share = np.array([T[g][idx[tuple(np.eye(5, dtype=int)[k])]] for k in (1, 2, 3)]) / w[g]
        assert np.all(np.abs(V[gi == g][:, 1:4].sum(axis=0) - share) < 1.0 + 1e-9)
    parts = np.array([[2.4, 3.3, 4.3], [0.5, 0.5, 2.0], [1.0, 1.0, 1.0]])
    got = _apportion(parts, np.array([10, 3, 3]))
    assert np.array_equal(got.sum(axis=1), [10, 3, 3]) and np.all(np.abs(got - parts) < 1.0 + 1e-12)


@pytest.mark.parametrize("d,K", [(7, 2), (3, 3), (4, 4), (1, 2)])
def test_shift_matrix_maps_raw_moments_to_shifted_scaled_ones(d, K):
    """T[i] @ (Σ_rows v^e) = Σ_rows Π((v − c_i)/s_i)^e for every monomial e of order ≤ K, computed directly."""
    from fedglmm.coordinator.virtual import _shift_matrix

    rng = np.random.default_rng(d * 10 + K)
    expo = np.asarray(monomials(d, K))
    V = rng.normal(1.0, 2.0, size=(30, d))
    c, s = rng.normal(size=(4, d)), rng.uniform(0.5, 2.0, size=(4, d))
    c[0] = 0.0                                                      # (0⁰ = 1 where a centre is 0)
    raw = np.array([np.sum(np.prod(V ** e, axis=1)) for e in expo])
    T = _shift_matrix(expo, c, s)
    for i in range(len(c)):
        want = np.array([np.sum(np.prod(((V - c[i]) / s[i]) ** e, axis=1)) for e in expo])
        assert np.allclose(T[i] @ raw, want, rtol=1e-9, atol=1e-9 * np.max(np.abs(want)))
