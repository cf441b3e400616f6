"""Families with a dispersion parameter (negative binomial, Gamma): densities against scipy, every η-, ψ- and
mixed derivative against central finite differences of the family's own functions, and the GLMM engine's
gradient and Hessian in (β, θ, ψ) against finite differences of its value and gradient (Laplace and
AGHQ, scalar and vector random effects, with and without prior weights)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedglmm.likelihood.laplace import GLMMLikelihood
from fedglmm.model.dispersion import GammaFamily, NegativeBinomial
from fedglmm.model.spec import Design

NB = NegativeBinomial("negative_binomial", "log")
GAMMAS = {lk: GammaFamily("gamma", lk) for lk in ("log", "inverse", "identity")}
FAMILIES = {"nb": NB, **{f"gamma_{lk}": f for lk, f in GAMMAS.items()}}


def _rows(fam):
    """(y, m, η, ψ) covering small and large counts / values, weights, and dispersions."""
    rng = np.random.default_rng(3)
    n = 40
    m = np.r_[np.ones(20), rng.uniform(0.2, 3.0, 20)]
    psi = rng.uniform(-1.5, 4.0, n)
    if fam is NB:
        eta = rng.uniform(-4.0, 6.0, n)
        y = np.r_[np.zeros(5), rng.integers(0, 400, n - 5)].astype(float)
    else:
        eta = {"log": rng.uniform(-3.0, 6.0, n), "inverse": rng.uniform(0.05, 3.0, n),
               "identity": rng.uniform(0.1, 50.0, n)}[fam.link]
        y = rng.gamma(2.0, 2.0, n) + 1e-3
    return y, m, eta, psi


def _all(fam, y, m, eta, psi):
    d1, d2, w, w1 = fam.derivs(y, m, eta, psi)
    d3, w2 = fam.derivs2(y, m, eta, psi)
    dp = fam.dispersion_derivs(y, m, eta, psi)
    return {"l": fam.loglik(y, m, eta, psi), "d1": d1, "d2": d2, "d3": d3, "d4": fam.d4(y, m, eta, psi),
            "w": w, "w1": w1, "w2": w2, **vars(dp)}


# (derivative, of what, with respect to): every derivative from two directions where it has two
CHAINS = [("d1", "l", "eta"), ("d2", "d1", "eta"), ("d3", "d2", "eta"), ("d4", "d3", "eta"),
          ("w1", "w", "eta"), ("w2", "w1", "eta"),
          ("p1", "l", "psi"), ("pp", "p1", "psi"), ("d1p", "d1", "psi"), ("d1p", "p1", "eta"),
          ("d2p", "d2", "psi"), ("d2p", "d1p", "eta"), ("d3p", "d3", "psi"), ("d3p", "d2p", "eta"),
          ("d1pp", "d1p", "psi"), ("d1pp", "pp", "eta"), ("d2pp", "d2p", "psi"), ("d2pp", "d1pp", "eta")]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: f"{c[0]}=d{c[1]}/d{c[2]}")
def test_derivatives_match_finite_differences(name, chain):
    fam = FAMILIES[name]
    y, m, eta, psi = _rows(fam)
    key, base, wrt = chain
    got = _all(fam, y, m, eta, psi)[key]
    h = 1e-6 * np.maximum(1.0, np.abs(eta if wrt == "eta" else psi))
    shift = {"eta": (h, 0.0), "psi": (0.0, h)}[wrt]
    hi = _all(fam, y, m, eta + shift[0], psi + shift[1])[base]
    lo = _all(fam, y, m, eta - shift[0], psi - shift[1])[base]
    fd = (hi - lo) / (2.0 * h)
    scale = np.abs(hi) + np.abs(lo) + np.abs(fd)
    assert np.all(np.abs(got - fd) <= 1e-6 * scale + 1e-12), (key, np.max(np.abs(got - fd) / (scale + 1e-300)))


@pytest.mark.parametrize("name", FAMILIES)
def test_density_is_the_full_log_likelihood(name):
    """loglik + constant is m × scipy's log-density (nbinom2: size ϑ, prob ϑ/(ϑ + μ); Gamma: shape ν,
    scale μ/ν), and the Fisher weight is m μ'² / V(μ)."""
    fam = FAMILIES[name]
    y, m, eta, psi = _rows(fam)
    mu, disp = fam.mean(eta), np.exp(psi)
    full = np.array([fam.loglik(y[i:i + 1], m[i:i + 1], eta[i:i + 1], psi[i]) [0] + fam.constant(y[i:i + 1], m[i:i + 1])
                     for i in range(len(y))])
    if fam is NB:
        ref = stats.nbinom.logpmf(y, disp, disp / (disp + mu))
        var = mu + mu ** 2 / disp
    else:
        ref = stats.gamma.logpdf(y, disp, scale=mu / disp)
        var = mu ** 2 / disp
    np.testing.assert_allclose(full, m * ref, rtol=1e-11, atol=1e-9)
    h = 1e-6
    dmu = (fam.mean(eta + h) - fam.mean(eta - h)) / (2 * h)
    np.testing.assert_allclose(fam.derivs(y, m, eta, psi)[2], m * dmu ** 2 / var, rtol=1e-7)


def test_observed_curvature_and_reported_dispersion():
    """The Laplace determinant uses −∂²ℓ/∂η² (glmmTMB); Gamma's inverse link is canonical (it equals the
    Fisher weight); ϑ = e^ψ and σ = e^{−ψ/2} (glmmTMB's sigma: the CV), with their slopes in ψ."""
    y, m, eta, psi = _rows(GAMMAS["inverse"])
    w = GAMMAS["inverse"].curvature(y, m, eta, "observed", psi)[0]
    np.testing.assert_allclose(w, GAMMAS["inverse"].derivs(y, m, eta, psi)[2], rtol=1e-12)
    y, m, eta, psi = _rows(NB)
    np.testing.assert_array_equal(NB.curvature(y, m, eta, "observed", psi)[0], -NB.derivs(y, m, eta, psi)[1])
    assert NB.dispersion(np.log(2.5)) == pytest.approx(2.5) and NB.dispersion_slope(0.3) == pytest.approx(np.exp(0.3))
    g = GAMMAS["log"]
    assert g.dispersion(np.log(4.0)) == pytest.approx(0.5)
    assert g.dispersion_slope(0.7) == pytest.approx((g.dispersion(0.7 + 1e-6) - g.dispersion(0.7 - 1e-6)) / 2e-6)


def _design(fam, q, weights, seed=1, G=12):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), rng.integers(3, 9, G))
    n = len(g)
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)])
    b = rng.normal(size=(G, q)) * 0.3
    eta = X @ [0.5, 0.3, -0.2] + np.sum(X[:, :q] * b[g], axis=1)
    if fam is NB:
        mu = np.exp(eta)
        y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
    else:
        mu = {"log": np.exp(eta), "inverse": 1.0 / (1.0 + 0.2 * (eta - 0.5)), "identity": 2.0 + 0.3 * eta}[fam.link]
        y = rng.gamma(3.0, mu / 3.0)
    return Design(y=y, trials=rng.uniform(0.5, 2.0, n) if weights else np.ones(n), offset=np.zeros(n), X=X,
                  Z=X[:, :q], group=g, group_levels=[str(i) for i in range(G)], x_names=["Intercept", "x", "z"],
                  z_names=["Intercept", "x"][:q], theta_mask=np.tril(np.ones((q, q), bool)))


POINTS = {"log": ([0.4, 0.25, -0.15], [0.3, 0.1, 0.25], 0.5), "inverse": ([1.0, 0.06, -0.04], [0.05, 0.01, 0.03], 1.0),
          "identity": ([2.1, 0.3, -0.06], [0.1, 0.02, 0.06], 1.0)}
ENGINE_CASES = [(name, nagq, q, w) for name in FAMILIES for nagq, q, w in ((1, 1, False), (1, 2, True), (4, 1, True))]


@pytest.mark.parametrize("name,nagq,q,weights", ENGINE_CASES, ids=[f"{c[0]}-gh{c[1]}-q{c[2]}-w{int(c[3])}"
                                                                    for c in ENGINE_CASES])
def test_engine_derivatives_in_dispersion(name, nagq, q, weights):
    """The site's gradient is the central difference of its value, and its Hessian (analytic for Laplace,
    differences of the analytic gradient for AGHQ) that of its gradient, in every coordinate incl. ψ."""
    fam = FAMILIES[name]
    eng = GLMMLikelihood(_design(fam, q, weights), fam, nagq)
    beta, theta, psi = POINTS[fam.link]
    phi = np.r_[beta, theta[:1] if q == 1 else theta, psi]
    ev = eng.evaluate(phi)
    h = 1e-5
    for t in range(len(phi)):
        e = np.zeros(len(phi))
        e[t] = h
        hi, lo = eng.evaluate(phi + e), eng.evaluate(phi - e)
        g_fd, H_fd = (hi.value - lo.value) / (2 * h), (hi.grad - lo.grad) / (2 * h)
        assert abs(ev.grad[t] - g_fd) <= 1e-7 * (1.0 + abs(g_fd)), (t, ev.grad[t], g_fd)
        assert np.max(np.abs(ev.hess[:, t] - H_fd)) <= 1e-6 * (1.0 + np.max(np.abs(H_fd))), (t, ev.hess[:, t], H_fd)


def test_glm_without_random_effects_has_the_dispersion_too():
    d = _design(NB, 1, True)
    d = Design(y=d.y, trials=d.trials, offset=d.offset, X=d.X, Z=np.zeros((d.n, 0)), group=np.zeros(d.n, int),
               group_levels=["."], x_names=d.x_names, z_names=[], theta_mask=np.zeros((0, 0), bool))
    eng = GLMMLikelihood(d, NB)
    phi = np.array([0.4, 0.2, -0.1, 0.7])
    ev = eng.evaluate(phi)
    full = NB.loglik(d.y, d.trials, d.X @ phi[:3], phi[3]).sum() + NB.constant(d.y, d.trials)
    assert ev.value == pytest.approx(full, rel=1e-13)
    for t in range(4):
        e = np.eye(4)[t] * 1e-5
        hi, lo = eng.evaluate(phi + e), eng.evaluate(phi - e)
        np.testing.assert_allclose(ev.hess[:, t], (hi.grad - lo.grad) / 2e-5, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["nb", "gamma_log"])
def test_quadrature_value_is_the_integral(name):
    """With many nodes the AGHQ value is the marginal log-likelihood, Σ_g log ∫ Π_j f(y_j | η_j + σu) φ(u) du,
    computed here independently by scipy's adaptive quadrature (scalar random effect, weighted rows)."""
    from scipy import integrate

    fam = FAMILIES[name]
    d = _design(fam, 1, True, seed=4, G=5)
    beta, theta, psi = POINTS[fam.link]
    phi = np.r_[beta, theta[:1], psi]
    value = GLMMLikelihood(d, fam, 30).evaluate(phi).value
    eta0 = d.X @ np.asarray(beta)
    total = 0.0
    for g in range(5):
        rows = d.group == g
        y, m, e = d.y[rows], d.trials[rows], eta0[rows]
        const = fam.constant(y, m)

        def f(u):
            return np.exp(np.sum(fam.loglik(y, m, e + theta[0] * u, psi)) + const - 0.5 * u * u) / np.sqrt(2 * np.pi)

        total += np.log(integrate.quad(f, -12, 12, epsabs=0, epsrel=1e-12, limit=200)[0])
    assert value == pytest.approx(total, rel=1e-9, abs=1e-9)


def _two_factor_design(fam, crossed: bool, seed: int = 2):
    from fedglmm.model.spec import Grouping

    rng = np.random.default_rng(seed)
    n = 240
    a = np.sort(rng.integers(0, 12, n)) if crossed else np.repeat(np.arange(12), 20)
    b = rng.integers(0, 8, n) if crossed else np.repeat(np.arange(48), 5)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    eta = 0.4 + 0.3 * X[:, 1] + rng.normal(0, 0.4, 12)[a] + rng.normal(0, 0.3, 48)[b]
    if fam is NB:
        y = rng.negative_binomial(2.0, 2.0 / (2.0 + np.exp(eta))).astype(float)
    else:
        y = rng.gamma(3.0, {"log": np.exp(eta), "inverse": 1 / (1 + 0.1 * eta), "identity": 2 + eta}[fam.link] / 3.0)
    facs = (Grouping("a", a, [str(i) for i in range(12)], np.array([0, 1])),
            Grouping("b", b, [str(i) for i in range(8 if crossed else 48)], np.array([2])))
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = mask[1, 0] = mask[1, 1] = mask[2, 2] = True
    return Design(y=y, trials=rng.uniform(0.5, 2, n), offset=np.zeros(n), X=X,
                  Z=np.column_stack([np.ones(n), X[:, 1], np.ones(n)]), group=a,
                  group_levels=[str(i) for i in range(12)], x_names=["Intercept", "x"],
                  z_names=["Intercept", "x", "Intercept"], theta_mask=mask, group_name="a", factors=facs,
                  weighted=True)


ML_POINTS = {"log": [0.35, 0.25, 0.3, 0.05, 0.2, 0.25, 0.6], "inverse": [0.95, -0.03, 0.03, 0.005, 0.02, 0.02, 1.0],
             "identity": [2.3, 0.3, 0.3, 0.05, 0.2, 0.2, 1.0]}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("crossed", [False, True], ids=["nested", "crossed"])
def test_multilevel_engine_gradient_in_dispersion(name, crossed):
    """The several-factor engine's analytic gradient, ψ included, against differences of its value."""
    from fedglmm.likelihood.multilevel import MultiLevelGLMM

    fam = FAMILIES[name]
    eng = MultiLevelGLMM(_two_factor_design(fam, crossed), fam)
    phi = np.asarray(ML_POINTS[fam.link])
    grad = eng.evaluate(phi, hess=False).grad
    for t in range(len(phi)):
        e = np.eye(len(phi))[t] * 1e-6
        fd = (eng.evaluate(phi + e, hess=False).value - eng.evaluate(phi - e, hess=False).value) / 2e-6
        assert abs(grad[t] - fd) <= 2e-7 * (1.0 + abs(fd)), (t, grad[t], fd)


def _exact_nb(y: int, mu: float, th: float, m: float = 1.0):
    """ℓ (without −log y! and y log y − y, which the family keeps in its constant), ∂ℓ/∂ψ and ∂²ℓ/∂ψ² of one
    NB row in 60-digit decimal arithmetic, from the finite sums that log Γ(y + ϑ) − log Γ(ϑ), ψ(y + ϑ) − ψ(ϑ)
    and ψ₁(y + ϑ) − ψ₁(ϑ) are for whole y."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 60
        Y, M, T = Decimal(y), Decimal(mu), Decimal(th)
        S = T + M
        lg = sum(((T + k).ln() for k in range(y)), Decimal(0))
        dg = sum((1 / (T + k) for k in range(y)), Decimal(0))
        tg = -sum((1 / (T + k) ** 2 for k in range(y)), Decimal(0))
        ll = T * (T / S).ln() + Y * (M / S).ln() + lg - (Y * Y.ln() - Y if y > 0 else Decimal(0))
        d_th = (T / S).ln() + 1 - (T + Y) / S + dg                 # ∂ℓ/∂ϑ
        d_thth = 1 / T - 1 / S - (S - T - Y) / S ** 2 + tg         # ∂²ℓ/∂ϑ²
        return [float(Decimal(m) * v) for v in (ll, T * d_th, T * d_th + T * T * d_thth)]


@pytest.mark.parametrize("th", [20.0, 49.9, 50.0, 1e3, 1e6, 1e9, 1e13])
def test_negative_binomial_towards_the_poisson_limit(th):
    """ℓ, ∂ℓ/∂ψ and ∂²ℓ/∂ψ² to 1e-10 relative of exact values at any ϑ: for large ϑ they are formed from
    asymptotic series without cancellation (the direct differences lost every digit at ϑ ≈ 1e9)."""
    ys = [0, 1, 2, 5, 17, 60, 400]
    mus = [0.03, 1.1, 3.7, 55.0]
    rows = [(y, mu) for y in ys for mu in mus]
    y = np.array([r[0] for r in rows], float)
    mu = np.array([r[1] for r in rows])
    m = np.full(len(rows), 1.5)
    eta, psi = np.log(mu), np.log(th)
    ll = NB.loglik(y, m, eta, psi)
    dp = NB.dispersion_derivs(y, m, eta, psi)
    for i, (yi, mi) in enumerate(rows):
        ref = _exact_nb(int(yi), float(mu[i]), float(np.exp(psi)), 1.5)
        for got, want, what in zip((ll[i], dp.p1[i], dp.pp[i]), ref, ("loglik", "p1", "pp")):
            assert abs(got - want) <= 1e-10 * abs(want) + 1e-300, (what, yi, mi, got, want)


def test_lgamma_difference_of_large_counts_keeps_its_digits():
    """log Γ(y + ϑ) − log Γ(ϑ) − (y log y − y) to 1e-12 (absolute) of the decimal sum Σ log(ϑ + k) for counts up
    to 27 000 -- where the difference of the two Γ terms, each 2.5e5, was off by 1e-10 and more, varying from
    ϑ to ϑ, and summed over 1000 rows moved the logLik by 3e-8 between two splits of the same data -- and for
    every ϑ regime (Stirling in y + ϑ from 20, in ϑ from 50, the Γ terms below)."""
    from decimal import Decimal, localcontext

    from fedglmm.model.dispersion import _lgamma_diff

    with localcontext() as ctx:
        ctx.prec = 34
        for y, th in [(27000, 20.0), (27000, 3.7), (27000, 1e4), (5000, 0.35), (19, 0.9), (0, 20.0), (1, 19.5),
                      (12, 49.9), (3, 1e9)]:
            Y, T = Decimal(y), Decimal(th)
            ref = sum(((T + k).ln() for k in range(y)), Decimal(0)) - (Y * Y.ln() - Y if y else Decimal(0))
            got = float(_lgamma_diff(np.float64(y), np.float64(th)))
            assert abs(got - float(ref)) <= 1e-12 * max(1.0, abs(float(ref))), (y, th, got, float(ref))


def test_negative_binomial_of_large_counts_same_loglik_from_every_split():
    """Overdispersed counts of 3e4 (the held-out sim_pois_huge design with ϑ = 20): the hybrid and the iterative
    method, pooled and over 3 sites, report one logLik to 1e-9 (they were 9e-8 apart)."""
    import fedglmm

    df = pd.read_csv(Path(__file__).parent / "data" / "heldout" / "rounds" / "sim_pois_huge.csv")
    df["y"] = np.random.default_rng(0).negative_binomial(20, 20 / (20 + df.y))
    codes = df.g.astype("category").cat.codes
    sites = {f"s{i}": df[codes % 3 == i].reset_index(drop=True) for i in range(3)}
    lls = [fedglmm.fit("y ~ x + (1 | g)", d, family="negative_binomial", method=m).loglik
           for d in (df, sites) for m in ("iterative", "hybrid")]
    assert max(lls) - min(lls) < 1e-9, lls


def test_gamma_log_density_of_a_small_dispersion_keeps_its_digits():
    """With a small dispersion (shape ν = 1e4: a CV of 1 %) the Gamma log-density's terms ν log ν, log Γ(ν),
    ν log y are 1e5 and cancel to ~1: written as ν (log r − r + 1) + (ν log ν − ν − log Γ(ν)), r = y/μ, it
    equals the decimal value to 1e-12 for every link (the direct form was off by 1e-11 and more), and a
    GLMM's logLik no longer depends on how its rows are split (1.4e-8 apart before)."""
    from decimal import Decimal, localcontext

    import fedglmm
    from fedglmm.model.families import get_family

    nu = 10_000
    with localcontext() as ctx:
        ctx.prec = 34
        lgam = sum((Decimal(k).ln() for k in range(1, nu)), Decimal(0))
        for link in ("log", "inverse", "identity"):
            fam = get_family("gamma", link)
            for y, mu in [(1.0, 1.0), (2.5, 2.4), (0.003, 5.0), (40.0, 0.5)]:
                eta = np.float64({"log": np.log(mu), "inverse": 1 / mu, "identity": mu}[link])
                E = Decimal(float(eta))
                M = E.exp() if link == "log" else (1 / E if link == "inverse" else E)
                Y, N = Decimal(y), Decimal(nu)
                ref = N * N.ln() - N * M.ln() + N * Y.ln() - N * Y / M - lgam
                got = float(fam.loglik(np.float64(y), 1.0, eta, np.log(np.float64(nu))))
                assert abs(got - float(ref)) <= 1e-12 * max(1.0, abs(float(ref))), (link, y, mu, got, float(ref))
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(60), 25)
    x = rng.normal(size=len(g))
    mu = np.exp(1.0 + 0.3 * x + rng.normal(0, 0.3, 60)[g])
    df = pd.DataFrame({"y": rng.gamma(1e4, mu / 1e4), "x": x, "g": g})
    sites = {f"s{i}": df[g % 3 == i].reset_index(drop=True) for i in range(3)}
    lls = [fedglmm.fit("y ~ x + (1 | g)", d, family="gamma", link="log", method=m).loglik
           for d in (df, sites) for m in ("iterative", "hybrid")]
    assert max(lls) - min(lls) < 1e-10, lls


def test_negative_binomial_loglik_of_large_counts_near_the_poisson_limit():
    """A count of 2e4 with μ near it: ℓ to 2e-11 (absolute) of the decimal value at ϑ from 1e3 to 1e45 (ψ up to
    104, where a poisson-like fit's ψ heads): its two terms y log(1 + ϑ/y) and y log(1 + ϑ/μ), each y ψ, and
    the rounding of η − ψ in μ/ϑ lost up to 4e-10 a row, 1e-8 of sim_pois_huge's logLik over 1000 rows."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 60
        for th in (1e3, 1e13, 1e20, 1e45):
            for y, mu in ((20000, 20100.0), (20000, 19876.5), (25000, 24990.1), (150, 170.2), (3, 2.5), (0, 4.0)):
                eta = np.log(mu)
                Y, M, T = Decimal(y), Decimal(float(np.exp(eta))), Decimal(th)
                S = T + M
                lg = sum(((T + k).ln() for k in range(y)), Decimal(0))
                ref = T * (T / S).ln() + Y * (M / S).ln() + lg - (Y * Y.ln() - Y if y > 0 else Decimal(0))
                got = float(NB.loglik(np.float64(y), 1.0, eta, np.log(th)))
                assert abs(got - float(ref)) <= 2e-11, (th, y, mu, got - float(ref))
