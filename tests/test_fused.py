"""The fused Laplace kernel (fedglmm.likelihood.kernel) against the numpy engine it reorganises.

Every model of tests/test_likelihood.py (logit, probit and cloglog with observed and expected curvature,
cbind trials, poisson with an offset; random intercepts, correlated and uncorrelated slopes): value,
gradient, Hessian and conditional modes at a point away from the optimum and from a cold start, to a
relative 1e-9; the numpy engine's own gradient and Hessian are checked against finite differences in
test_likelihood.py.  Also: log Φ against scipy, chunks in parallel threads give the chunks' sum, a failing
point gives NaN as the numpy engine does, and the modes' warm start moves along dû/dφ.
"""
import numpy as np
import pytest
from scipy import special

from fedglmm.likelihood import fused
from fedglmm.likelihood.laplace import GLMMLikelihood

from test_likelihood import MODELS, load, start_phi

pytest.importorskip("numba")


def _pair(key):
    (name, formula), family, link, theta, curvature = MODELS[key]
    d, fam = load(name, formula, family, link)
    return (GLMMLikelihood(d, fam, 1, curvature=curvature), GLMMLikelihood(d, fam, 1, curvature=curvature),
            start_phi(d, theta))


def _close(a, b, what, rtol=1e-9):
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = max(1.0, float(np.max(np.abs(b))))
    assert np.max(np.abs(a - b)) <= rtol * scale, f"{what}: {np.max(np.abs(a - b)) / scale:.2e}"


@pytest.mark.parametrize("key", list(MODELS))
def test_fused_equals_numpy(key, monkeypatch):
    ref, fast, phi = _pair(key)
    monkeypatch.setattr(fused, "MIN_ROWS", 10**12)
    want = ref.evaluate(phi)
    want_modes = ref.conditional_modes(phi)
    monkeypatch.setattr(fused, "MIN_ROWS", 0)
    assert fused.usable(fast)
    got = fast.evaluate(phi)
    _close(got.value, want.value, f"{key} value", 1e-11)
    _close(got.grad, want.grad, f"{key} gradient")
    _close(got.hess, want.hess, f"{key} Hessian")
    for g, w in zip(fast.conditional_modes(phi), want_modes):
        _close(g, w, f"{key} modes")


@pytest.mark.parametrize("family,link", [("binomial", "logit"), ("poisson", None), ("binomial", "probit")])
def test_three_random_effects_and_a_z_column_outside_x_equal_numpy(family, link, monkeypatch):
    """q = 3 (every pair of Λ's entries in the kernel's group sums) with a random slope on a column that is
    not a fixed effect, and Λ with a zero entry: value, gradient and Hessian equal the numpy engine's."""
    from fedglmm.model.families import get_family
    from test_likelihood import make_design

    rng = np.random.default_rng(11)
    G, r = 60, 12
    n = G * r
    x, w = rng.normal(size=n), rng.normal(size=n)
    g = np.repeat(np.arange(G), r)
    X, Z = np.c_[np.ones(n), x], np.c_[np.ones(n), x, w]
    lam = np.array([[0.8, 0.0, 0.0], [0.2, 0.4, 0.0], [0.0, -0.1, 0.3]])
    b = rng.normal(size=(G, 3)) @ lam.T
    eta = X @ np.array([-0.2, 0.4]) + np.sum(Z * b[g], axis=1)
    fam = get_family(family, link)
    y = rng.binomial(1, fam.mean(eta)) if family == "binomial" else rng.poisson(np.exp(eta))
    d = make_design(X, Z, y, g)
    phi = np.r_[-0.1, 0.3, 0.7, 0.1, 0.0, 0.5, -0.2, 0.25]
    ref, fast = GLMMLikelihood(d, fam, 1), GLMMLikelihood(d, fam, 1)
    monkeypatch.setattr(fused, "MIN_ROWS", 10**12)
    want = ref.evaluate(phi)
    monkeypatch.setattr(fused, "MIN_ROWS", 0)
    assert fused.usable(fast)
    got = fast.evaluate(phi)
    _close(got.value, want.value, "value", 1e-11)
    _close(got.grad, want.grad, "gradient")
    _close(got.hess, want.hess, "Hessian")


def test_random_models_equal_numpy(monkeypatch):
    """120 random models (every family and link of the kernel, observed and expected curvature, q = 1-3,
    groups of 1-11 rows, cbind trials, Z with or without an intercept, random-effect SDs 0.2-3): the
    kernel's value, gradient and Hessian equal the numpy engine's to a relative 1e-9."""
    from fedglmm.model.families import get_family
    from test_likelihood import make_design

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(120):
        q, G, p = int(rng.integers(1, 4)), int(rng.integers(5, 60)), int(rng.integers(1, 4))
        sizes = rng.integers(1, 12, G)
        n, g = int(sizes.sum()), np.repeat(np.arange(G), sizes)
        X = np.c_[np.ones(n), rng.normal(size=(n, p - 1))]
        Z = np.c_[np.ones(n), rng.normal(size=(n, q - 1))] if rng.random() < 0.7 else rng.normal(size=(n, q))
        name, link = [("binomial", "logit"), ("binomial", "probit"), ("binomial", "cloglog"),
                      ("poisson", None)][rng.integers(0, 4)]
        fam = get_family(name, link)
        L = np.tril(rng.normal(scale=rng.choice([0.2, 1.0, 3.0]), size=(q, q)))
        eta = X @ rng.normal(scale=0.5, size=p) + np.sum(Z * (rng.normal(size=(G, q)) @ L.T)[g], axis=1)
        m = np.ones(n) if rng.random() < 0.6 or name == "poisson" else rng.integers(1, 6, n).astype(float)
        y = rng.binomial(m.astype(int), np.clip(fam.mean(np.clip(eta, -20, 20)), 1e-9, 1 - 1e-9)) \
            if name == "binomial" else rng.poisson(np.exp(np.clip(eta, -5, 4)))
        d = make_design(X, Z, y, g, trials=m)
        phi = np.r_[rng.normal(scale=0.3, size=p), L[np.tril_indices(q)] * rng.uniform(0.5, 1.5)]
        for curvature in ("observed", "expected"):
            ref, fast = GLMMLikelihood(d, fam, 1, curvature=curvature), GLMMLikelihood(d, fam, 1, curvature=curvature)
            monkeypatch.setattr(fused, "MIN_ROWS", 10**12)
            want = ref.evaluate(phi)
            monkeypatch.setattr(fused, "MIN_ROWS", 0)
            got = fast.evaluate(phi)
            if not np.isfinite(want.value):
                continue
            checked += 1
            _close(got.value, want.value, "value", 1e-9)
            _close(got.grad, want.grad, "gradient")
            _close(got.hess, want.hess, "Hessian")
    assert checked >= 200


def test_log_ndtr_matches_scipy():
    from fedglmm.likelihood.rows import log_ndtr

    x = np.r_[np.linspace(-60, 12, 2001), -37.5, -37.49, -1.0, -0.999, 0.0]
    ours = np.array([log_ndtr(v) for v in x])
    np.testing.assert_allclose(ours, special.log_ndtr(x), rtol=2e-14, atol=1e-300)


def test_chunks_in_threads_sum_to_the_whole(monkeypatch):
    ref, fast, phi = _pair("sim-logit-slope")
    monkeypatch.setattr(fused, "MIN_ROWS", 0)
    whole = ref.evaluate(phi)
    monkeypatch.setattr(fused, "CHUNK_ROWS", 97)      # many chunks over the pool's threads
    parts = fast.evaluate(phi)
    assert len(fast._fused.chunks) > 5
    _close(parts.value, whole.value, "value", 1e-12)
    _close(parts.grad, whole.grad, "gradient", 1e-12)
    _close(parts.hess, whole.hess, "Hessian", 1e-12)


def test_failing_point_gives_nan_and_keeps_modes(monkeypatch):
    monkeypatch.setattr(fused, "MIN_ROWS", 0)
    ref, lik, phi = _pair("pois-offset-int")
    good = lik.evaluate(phi)
    modes = lik.u.copy()
    bad = lik.evaluate(phi + np.r_[800.0, np.zeros(len(phi) - 1)])
    assert np.isnan(bad.value) and np.all(np.isnan(bad.grad))
    np.testing.assert_array_equal(lik.u, modes)
    assert lik.evaluate(phi).value == pytest.approx(good.value, rel=1e-12)


@pytest.mark.parametrize("key", ["contra-logit-slope", "sim-probit-slope", "sim-cloglog-int", "pois-offset-slope"])
@pytest.mark.parametrize("far", [-6.0, 6.0])
def test_modes_from_a_far_start_equal_numpy(key, far, monkeypatch):
    """Modes started far off (every group's û at ±6): full Newton steps overshoot, h's slope at their end is
    negative and the step test (h at both ends, halving) decides; the kernel ends where the numpy engine does."""
    ref, fast, phi = _pair(key)
    monkeypatch.setattr(fused, "MIN_ROWS", 10**12)
    ref.u = np.full_like(ref.u, far)
    want = ref.evaluate(phi)
    monkeypatch.setattr(fused, "MIN_ROWS", 0)
    fast.u = np.full_like(fast.u, far)
    got = fast.evaluate(phi)
    _close(got.value, want.value, f"{key} value", 1e-11)
    _close(got.grad, want.grad, f"{key} gradient")
    _close(fast.u, ref.u, f"{key} modes")


def test_warm_start_moves_along_the_mode_derivative(monkeypatch):
    """After an evaluation at φ, the modes at φ + δ start from û + dû/dφ·δ, within O(δ²) of the answer."""
    monkeypatch.setattr(fused, "MIN_ROWS", 0)
    _, lik, phi = _pair("contra-logit-slope")
    lik.evaluate(phi)
    u0, (phi0, dU) = lik.u.copy(), lik._last
    delta = np.full(len(phi), 0.01)
    lik.evaluate(phi + delta)
    predicted = u0 + dU @ delta
    assert np.max(np.abs(predicted - lik.u)) < 0.05 * np.max(np.abs(lik.u - u0))


@pytest.mark.parametrize("key", ["sim-logit-slope", "cbpp-cbind-logit", "pois-offset-slope"])
@pytest.mark.parametrize("order", [2, 4])
def test_compiled_moment_sums_equal_numpy(key, order, monkeypatch):
    """The one-shot message's per-group moments (Bernoulli rows, cbind trials, counts with an offset)."""
    from fedglmm.site import summaries

    (name, formula), family, link, *_ = MODELS[key]
    d, _ = load(name, formula, family, link)
    keep = np.ones(len(d.starts), bool)
    monkeypatch.setattr(fused, "MIN_ROWS", 10**12)
    want = summaries._moment_blocks(d, d.starts, d.group_levels, keep, order)
    monkeypatch.setattr(fused, "MIN_ROWS", 0)
    got = summaries._moment_blocks(d, d.starts, d.group_levels, keep, order)
    assert got["variables"] == want["variables"] and got["levels"] == want["levels"]
    np.testing.assert_array_equal(got["n"], want["n"])
    np.testing.assert_allclose(got["moments"], want["moments"], rtol=1e-12, atol=1e-12)


def test_pooled_stand_ins_give_the_same_hybrid_fit(monkeypatch):
    """The coordinator's pseudo-data parts evaluated as one engine (many sites) or one per site: the same
    hybrid fit (its start and surrogate move only by rounding)."""
    import pandas as pd

    import fedglmm
    from fedglmm.coordinator import virtual
    from test_likelihood import DATA

    df = pd.read_csv(DATA / "extra_sim_logit_uncorr.csv")
    sites = {f"s{i}": df[pd.factorize(df["g"])[0] % 4 == i].reset_index(drop=True) for i in range(4)}
    formula = "y ~ x1 + x2 + (x1 || g)"
    per_site = fedglmm.fit(formula, sites, family="binomial")
    monkeypatch.setattr(virtual, "MERGE_ROWS", 0)
    pooled = fedglmm.fit(formula, sites, family="binomial")
    assert pooled.rounds == per_site.rounds
    np.testing.assert_allclose(pooled.fixef, per_site.fixef, rtol=1e-8)
    np.testing.assert_allclose(pooled.theta, per_site.theta, rtol=1e-8)
    assert pooled.loglik == pytest.approx(per_site.loglik, rel=1e-10)


def test_compiled_kernel_is_dropped_when_rows_py_changes(tmp_path):
    """numba stamps a cached function with its own file alone; a change of rows.py (or kernel_terms.py, which
    kernel.py compiles in) must drop kernel.py's and kernel_terms.py's compiled code too."""
    for f in fused._SOURCES:
        (tmp_path / f).write_text("k = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    compiled = [cache / "kernel._eta-23.py311.nbi", cache / "kernel._eta-23.py311.1.nbc",
                cache / "kernel_terms.derivatives-20.py311.nbi"]
    other = cache / "laplace.cpython-311.pyc"
    for f in compiled + [other]:
        f.write_text("x")
    fused._drop_stale_cache(tmp_path)                   # no record yet: dropped
    assert not any(f.exists() for f in compiled) and other.exists()
    for changed in ("rows.py", "kernel_terms.py"):
        for f in compiled:
            f.write_text("x")
        fused._drop_stale_cache(tmp_path)               # same sources: kept
        assert all(f.exists() for f in compiled)
        (tmp_path / changed).write_text("r = 2\n")
        fused._drop_stale_cache(tmp_path)               # a source changed: dropped
        assert not any(f.exists() for f in compiled) and other.exists()


def test_threads_only_where_a_site_holds_many_rows(monkeypatch):
    """Sites (or parts) answer in threads when they hold PARALLEL_ROWS rows in all and one of them SITE_ROWS;
    many small sites one after the other (their work is the interpreter's); unknown sizes in threads."""
    from types import SimpleNamespace as NS

    from fedglmm.transport import InProcessTransport

    small = [NS(n=1000) for _ in range(100)]
    assert not fused.threads_pay(small)                          # 1e5 rows, none with SITE_ROWS
    assert fused.threads_pay(small + [NS(n=fused.SITE_ROWS)])    # one large site among them
    assert not fused.threads_pay([NS(n=fused.SITE_ROWS)])        # fewer than PARALLEL_ROWS in all
    assert fused.threads_pay([NS(n=6000), NS(n=6000)])
    assert fused.threads_pay(small + [NS()])                     # a site that does not say
    monkeypatch.setattr("fedglmm.transport.inprocess.workers", lambda: 2)
    sites = {f"s{i}": NS(frame=np.zeros(n), audit=None) for i, n in enumerate([1000] * 20)}
    assert not InProcessTransport(sites)._in_parallel()
    sites["big"] = NS(frame=np.zeros(8000), audit=None)
    assert InProcessTransport(sites)._in_parallel()
    seen = []
    assert fused.parallel_map(lambda x: seen.append(x) or x * 2, [1, 2, 3], parallel=False) == [2, 4, 6]
    assert seen == [1, 2, 3]


def test_rows_from_holds_in_its_thread_and_is_undone():
    """In-process sites evaluate through the kernel from the rows the transport says, in their own thread
    only, and the default comes back after (also when a test changes MIN_ROWS meanwhile)."""
    import threading

    ref, _, _ = _pair("contra-logit-int")
    assert ref.n < fused.MIN_ROWS and not fused.usable(ref)
    seen = []
    with fused.rows_from(0):
        assert fused.usable(ref)
        t = threading.Thread(target=lambda: seen.append(fused.usable(ref)))
        t.start()
        t.join()
        with fused.rows_from(10**12):
            assert not fused.usable(ref)
        assert fused.usable(ref)
    assert seen == [False]                       # another thread keeps the default
    assert not fused.usable(ref) and fused.min_rows() == fused.MIN_ROWS


def test_in_process_sites_share_the_kernel_when_they_hold_many_rows(monkeypatch):
    """Sites of fewer than MIN_ROWS rows each use the kernel when, in one process, they hold MIN_ROWS
    together: the same fit (rounds, estimates) as with the numpy engine everywhere; a lone small site, or
    few rows in all, keeps the default."""
    from types import SimpleNamespace as NS

    import pandas as pd

    import fedglmm
    from fedglmm.transport import InProcessTransport
    from test_likelihood import DATA

    few = {f"s{i}": NS(frame=np.zeros(1000), audit=None) for i in range(4)}
    assert InProcessTransport(few)._kernel_rows() is None                    # 4000 rows in all
    assert InProcessTransport({"s": NS(frame=np.zeros(6000), audit=None)})._kernel_rows() is None
    few["s4"] = NS(frame=np.zeros(1000), audit=None)
    assert InProcessTransport(few)._kernel_rows() == 0

    df = pd.read_csv(DATA / "extra_sim_logit_uncorr.csv")
    sites = {f"s{i}": df[pd.factorize(df["g"])[0] % 4 == i].reset_index(drop=True) for i in range(4)}
    formula = "y ~ x1 + x2 + (x1 || g)"
    calls = []
    real = fused.evaluate
    monkeypatch.setattr(fused, "evaluate", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fused, "MIN_ROWS", len(df))          # the sites hold MIN_ROWS together
    shared = fedglmm.fit(formula, sites, family="binomial")
    assert calls                                               # the sites' engines went through the kernel
    calls.clear()
    monkeypatch.setattr(fused, "MIN_ROWS", len(df) + 1)        # one row short: numpy everywhere
    alone = fedglmm.fit(formula, sites, family="binomial")
    assert not calls
    assert shared.rounds == alone.rounds
    np.testing.assert_allclose(shared.fixef, alone.fixef, rtol=1e-8)
    np.testing.assert_allclose(shared.theta, alone.theta, rtol=1e-8)
    assert shared.loglik == pytest.approx(alone.loglik, rel=1e-11)


def test_coordinator_pseudo_data_in_chunks_and_small_parts_by_the_kernel(monkeypatch):
    """The sites' pseudo rows as one engine are cut into SPREAD chunks of SPREAD_ROWS at least (the same
    sums as one chunk), and where they hold MERGE_ROWS in all a site's own pseudo rows, however few, are
    evaluated by the kernel too (the same sums as numpy's)."""
    import pandas as pd

    from fedglmm.coordinator import virtual
    from fedglmm.coordinator.messages import merge_messages
    from fedglmm.likelihood.setup import make_setup
    from fedglmm.model.families import get_family
    from fedglmm.model.options import FitOptions
    from fedglmm.site.summaries import summarize
    from test_likelihood import DATA

    df = pd.read_csv(DATA / "extra_sim_logit_uncorr.csv")
    formula, fam = "y ~ x1 + x2 + (x1 || g)", get_family("binomial")
    codes = pd.factorize(df["g"])[0]
    replies = {f"s{i}": summarize(df[codes % 3 == i].reset_index(drop=True), formula, "binomial", None, f"s{i}",
                                  order=2) for i in range(3)}
    merged = merge_messages(replies, formula, fam)
    def parts_at(merge_rows):
        monkeypatch.setattr(virtual, "MERGE_ROWS", merge_rows)
        parts, _ = virtual.stand_ins(merged, replies, FitOptions(), 0, 4.0)
        st = make_setup({sid: p.setup for sid, p in parts.items()}, fam.ndisp)
        return parts, st

    parts, st = parts_at(0)
    rows = sum(p.design.n for p in parts.values())
    monkeypatch.setattr(fused, "SPREAD_ROWS", rows // 5)
    whole = virtual.part_engines(parts, st)[0]
    (eng,) = whole.values()
    phi = np.r_[np.linalg.solve(st.A, [-0.3, 0.5, -0.2]), 0.8 * st.zs]
    got = eng.evaluate(phi)
    assert eng.spread and len(eng._fused.chunks) == 5
    eng.spread, eng._fused, eng.u, eng._last = False, None, None, None
    want = eng.evaluate(phi)
    assert len(eng._fused.chunks) == 1
    _close(got.value, want.value, "value", 1e-12)
    _close(got.grad, want.grad, "gradient", 1e-12)
    _close(got.hess, want.hess, "Hessian", 1e-12)
    # one site's pseudo rows: by the kernel where the parts hold MERGE_ROWS, else by numpy
    sid = next(iter(parts))
    small = parts[sid].engines.get(st.A, st.zs)
    assert small.n < fused.MIN_ROWS and fused.usable(small)
    from fedglmm.coordinator.surrogate import pseudo_objective
    assert pseudo_objective({sid: parts[sid]}, st).nogil
    parts, st = parts_at(rows + 1)
    numpy_engine = parts[sid].engines.get(st.A, st.zs)
    assert not fused.usable(numpy_engine)
    assert not pseudo_objective({sid: parts[sid]}, st).nogil
    a, b = small.evaluate(phi), numpy_engine.evaluate(phi)
    _close(a.value, b.value, "value", 1e-11)
    _close(a.grad, b.grad, "gradient")
    _close(a.hess, b.hess, "Hessian")
