"""The site's likelihood engines: GLMMLikelihood (Laplace / adaptive Gauss–Hermite) and LMMSums.

* analytic gradients against central differences of the value (step 1e-5, relative 1e-6);
* the analytic Laplace Hessian against central differences of the analytic gradient (relative 1e-6);
* the value itself against independent computations: a brute-force Laplace approximation for one group
  (mode by scipy.optimize), the integral ∫ ∏ f(y | b) φ(b; 0, σ²) db by scipy.integrate.quad, and the
  convergence of AGHQ in the number of nodes and towards Laplace for large groups;
* for gaussian models, the θ-derivatives of A, b, c, d and of the profiled deviance, and the ML deviance
  against the multivariate normal density of each group.
"""
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize, special, stats

try:
    import fedglmm  # noqa: F401
except ImportError:      # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedglmm.model.design import build_design, describe_frame
from fedglmm.coordinator.schema import merge_schema
from fedglmm.model.families import get_family
from fedglmm.model.formula import parse_formula
from fedglmm.likelihood.lmm import LMMSums, profiled_deviance
from fedglmm.likelihood.laplace import GLMMLikelihood
from fedglmm.model.spec import Design

DATA = Path(__file__).parent / "data"
H_STEP = 1e-5
RTOL = 1e-6


# --- helpers --------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def load(name, formula, family="binomial", link=None):
    """(Design, Family) of one data file as a single site."""
    df = pd.read_csv(DATA / f"{name}.csv")
    spec = parse_formula(formula)
    fam = get_family(family, link)
    schema = merge_schema({"s": describe_frame(df, spec, "s")}, spec, fam)
    return build_design(spec, schema, df, fam, "s"), fam


def make_design(X, Z, y, group, trials=None, offset=None):
    """A Design from arrays (rows already sorted by group; Λ lower triangular, all entries free)."""
    q = Z.shape[1]
    G = int(group.max()) + 1
    return Design(y=np.asarray(y, float), trials=np.ones(len(y)) if trials is None else np.asarray(trials, float),
                  offset=np.zeros(len(y)) if offset is None else np.asarray(offset, float), X=X, Z=Z,
                  group=np.asarray(group), group_levels=[str(i) for i in range(G)],
                  x_names=[f"x{i}" for i in range(X.shape[1])], z_names=[f"z{i}" for i in range(q)],
                  theta_mask=np.tril(np.ones((q, q), bool)), group_name="g")


def split_groups(d: Design):
    """One single-group Design per group of d."""
    ends = np.r_[d.starts[1:], d.n]
    for a, b in zip(d.starts, ends):
        yield Design(y=d.y[a:b], trials=d.trials[a:b], offset=d.offset[a:b], X=d.X[a:b], Z=d.Z[a:b],
                     group=np.zeros(b - a, int), group_levels=["0"], x_names=d.x_names, z_names=d.z_names,
                     theta_mask=d.theta_mask, group_name=d.group_name)


def simulate(link, groups, rows, q, seed, family="binomial", trials=1):
    """Simulated GLMM data: η = β0 + β1 x + b0 + b1 x, Λ = [[0.9, 0], [0.3, 0.5]] (top-left q×q)."""
    rng = np.random.default_rng(seed)
    n = groups * rows
    x = rng.normal(size=n)
    g = np.repeat(np.arange(groups), rows)
    X = np.c_[np.ones(n), x]
    Z = X[:, :q].copy()
    lam = np.array([[0.9, 0.0], [0.3, 0.5]])[:q, :q]
    b = rng.normal(size=(groups, q)) @ lam.T
    beta = np.array([-0.3, 0.6]) if family == "binomial" else np.array([0.5, 0.3])
    eta = X @ beta + np.sum(Z * b[g], axis=1)
    fam = get_family(family, link)
    m = np.full(n, float(trials))
    y = rng.binomial(trials, fam.mean(eta)) if family == "binomial" else rng.poisson(np.exp(eta))
    theta = np.array([0.9]) if q == 1 else np.array([0.9, 0.3, 0.5])        # Λ11 (, Λ21, Λ22)
    return make_design(X, Z, y, g, trials=m), fam, np.r_[beta, theta]


def value(lik, phi):
    return lik.value_grad(np.asarray(phi, float), grad=False)[0]


def fd_gradient(lik, phi, h=H_STEP):
    phi = np.asarray(phi, float)
    out = np.empty(len(phi))
    for i in range(len(phi)):
        e = np.zeros(len(phi))
        e[i] = h
        out[i] = (value(lik, phi + e) - value(lik, phi - e)) / (2 * h)
    return out


def fd_hessian(lik, phi, h=H_STEP):
    phi = np.asarray(phi, float)
    P = len(phi)
    out = np.empty((P, P))
    for i in range(P):
        e = np.zeros(P)
        e[i] = h
        out[:, i] = (lik.value_grad(phi + e)[1] - lik.value_grad(phi - e)[1]) / (2 * h)
    return out


def assert_grad_close(analytic, numeric, what):
    """Component-wise relative 1e-6, with a floor of 1e-7 of the largest component (for near-zero ones)."""
    tol = RTOL * np.abs(analytic) + 1e-7 * np.max(np.abs(analytic))
    err = np.abs(analytic - numeric)
    assert np.all(err <= tol), f"{what}: analytic {analytic}, differences {numeric}, error/tolerance {err / tol}"


def assert_hess_close(analytic, numeric, what):
    """Relative 1e-6 in the Hessian's own scale: |ΔH_ij| ≤ 1e-6 sqrt(|H_ii H_jj|)."""
    d = np.sqrt(np.abs(np.diag(analytic)))
    tol = RTOL * np.outer(d, d)
    err = np.abs(analytic - numeric)
    assert np.all(err <= tol), f"{what}: worst error/tolerance {np.max(err / tol):.3g}\n{analytic}\n{numeric}"


def start_phi(d: Design, theta):
    """A point away from the optimum (non-zero gradient everywhere)."""
    rng = np.random.default_rng(7)
    beta = rng.normal(0.0, 0.3, d.X.shape[1]) / np.maximum(1.0, np.std(d.X, axis=0))
    return np.r_[beta, theta]


# --- 1. gradients -----------------------------------------------------------------------------------

CONTRA = ("contraception", "use ~ urban + age + livch + (1 | district)")
CONTRA_SLOPE = ("contraception", "use ~ urban + age + livch + (1 + urban | district)")
SLOPE1 = ("extra_sim_logit_slope", "y ~ x1 + (1 | g)")
SLOPE2 = ("extra_sim_logit_slope", "y ~ x1 + (1 + x1 | g)")
SLOPE_UNCORR = ("extra_sim_logit_slope", "y ~ x1 + (x1 || g)")
CBPP = ("cbpp", "cbind(incidence, size - incidence) ~ period + (1 | herd)")
POIS = ("extra_sim_pois_offset", "y ~ x + offset(log(t)) + (1 | g)")
POIS2 = ("extra_sim_pois_offset", "y ~ x + offset(log(t)) + (1 + x | g)")

# (data, formula), family, link, θ, curvature
MODELS = {
    "contra-logit-int": (CONTRA, "binomial", "logit", [0.7], "observed"),
    "contra-logit-slope": (CONTRA_SLOPE, "binomial", "logit", [0.7, -0.3, 0.5], "observed"),
    "sim-logit-slope": (SLOPE2, "binomial", "logit", [0.8, 0.2, 0.5], "observed"),
    "sim-logit-uncorr": (SLOPE_UNCORR, "binomial", "logit", [0.8, 0.5], "observed"),
    "sim-probit-int": (SLOPE1, "binomial", "probit", [0.6], "observed"),
    "sim-probit-int-expected": (SLOPE1, "binomial", "probit", [0.6], "expected"),
    "sim-probit-slope": (SLOPE2, "binomial", "probit", [0.6, 0.15, 0.3], "observed"),
    "sim-probit-slope-expected": (SLOPE2, "binomial", "probit", [0.6, 0.15, 0.3], "expected"),
    "sim-cloglog-int": (SLOPE1, "binomial", "cloglog", [0.7], "observed"),
    "sim-cloglog-slope": (SLOPE2, "binomial", "cloglog", [0.7, 0.2, 0.4], "observed"),
    "sim-cloglog-slope-expected": (SLOPE2, "binomial", "cloglog", [0.7, 0.2, 0.4], "expected"),
    "cbpp-cbind-logit": (CBPP, "binomial", "logit", [0.8], "observed"),
    "cbpp-cbind-probit": (CBPP, "binomial", "probit", [0.5], "observed"),
    "cbpp-cbind-cloglog": (CBPP, "binomial", "cloglog", [0.8], "observed"),
    "pois-offset-int": (POIS, "poisson", None, [0.6], "observed"),
    "pois-offset-slope": (POIS2, "poisson", None, [0.6, 0.1, 0.3], "observed"),
}


def model(key, nagq):
    (name, formula), family, link, theta, curvature = MODELS[key]
    d, fam = load(name, formula, family, link)
    return GLMMLikelihood(d, fam, nagq, curvature=curvature), start_phi(d, theta)


def _gradient_cases():
    for key, ((_, formula), *_rest) in MODELS.items():
        vector = "(1 +" in formula or "||" in formula
        for nagq in ((1, 3) if vector else (1, 3, 5)):
            yield pytest.param(key, nagq, id=f"{key}-K{nagq}")


@pytest.mark.parametrize("key, nagq", list(_gradient_cases()))
def test_gradient_matches_central_differences(key, nagq):
    lik, phi = model(key, nagq)
    v, g, _ = lik.value_grad(phi)
    assert np.isfinite(v)
    assert_grad_close(g, fd_gradient(lik, phi), f"{key} nAGQ={nagq}")


def test_vector_random_effect_uses_the_product_grid():
    lik, _ = model("sim-logit-slope", 3)
    assert lik.zk.shape == (9, 2)
    assert np.exp(lik.ck - 0.5 * np.sum(lik.zk**2, axis=1)).sum() == pytest.approx(1.0, rel=1e-12)


def test_glm_without_random_effects():
    d, fam = load("contraception", "use ~ urban + age + livch", "binomial", "logit")
    lik = GLMMLikelihood(d, fam, 1)
    phi = start_phi(d, [])
    v, g, aux = lik.value_grad(phi)
    eta = d.X @ phi
    assert v == pytest.approx(np.sum(stats.binom.logpmf(d.y, 1, special.expit(eta))), rel=1e-12)
    assert_grad_close(g, fd_gradient(lik, phi), "glm")
    assert_hess_close(aux["hess"], fd_hessian(lik, phi), "glm")


# --- 2. the analytic Laplace Hessian ----------------------------------------------------------------

@pytest.mark.parametrize("key", list(MODELS))
def test_laplace_hessian_matches_differences_of_the_gradient(key):
    lik, phi = model(key, 1)
    v, g, aux = lik.value_grad(phi, hess=True)
    H = aux["hess"]
    assert np.allclose(H, H.T, rtol=0, atol=1e-12 * np.max(np.abs(H)))
    assert_hess_close(H, fd_hessian(lik, phi), key)
    ev = lik.evaluate(phi)                 # the site's reply carries the same numbers
    assert ev.value == pytest.approx(v, rel=1e-13)
    assert np.allclose(ev.grad, g, rtol=1e-10, atol=1e-10 * np.max(np.abs(g)))
    assert np.allclose(ev.hess, H, rtol=1e-10, atol=1e-10 * np.max(np.abs(H)))


def test_aghq_hessian_is_differences_of_the_gradient():
    lik, phi = model("sim-probit-slope", 3)
    H = lik.evaluate(phi).hess
    assert_hess_close(H, fd_hessian(lik, phi), "AGHQ evaluate")


# --- 3. AGHQ: convergence in K and towards Laplace ---------------------------------------------------

@pytest.mark.parametrize("key", ["sim-logit-slope", "sim-probit-slope"])
def test_aghq_converges_as_nodes_grow_for_a_vector_random_effect(key):
    (name, formula), family, link, _, curvature = MODELS[key]
    d, fam = load(name, formula, family, link)
    phi = np.array([-0.2, 0.7, 1.0, 0.25, 0.55])          # near the fit: sds 1.0 and 0.6, corr 0.4
    vals = {K: value(GLMMLikelihood(d, fam, K, curvature=curvature), phi) for K in range(1, 12)}
    for start in (1, 2):                  # odd and even K separately
        steps = [abs(vals[K] - vals[K + 2]) for K in range(start, 10, 2)]
        assert all(a > b for a, b in zip(steps, steps[1:])), (key, start, steps)
    assert abs(vals[9] - vals[11]) < 1e-4, vals          # 50 groups: < 2e-6 per group
    assert abs(vals[1] - vals[3]) > 1e-2                 # the sequence does move


def _laplace_gap_per_group(d, fam, phi, nagq=5):
    return np.array([value(GLMMLikelihood(g, fam, nagq), phi) - value(GLMMLikelihood(g, fam, 1), phi)
                     for g in split_groups(d)])


@pytest.mark.parametrize("link", ["logit", "probit", "cloglog", "poisson"])
def test_aghq_approaches_laplace_for_large_groups(link):
    family = "poisson" if link == "poisson" else "binomial"
    lk = None if link == "poisson" else link
    big, fam, phi = simulate(lk, 6, 2000, 1, seed=1, family=family)
    small, _, _ = simulate(lk, 40, 5, 1, seed=2, family=family)
    gap_big = np.abs(_laplace_gap_per_group(big, fam, phi))
    gap_small = np.abs(_laplace_gap_per_group(small, fam, phi))
    assert gap_big.max() < 1e-3, gap_big
    # small groups: the same bound fails, by an order of magnitude more than large groups pass it
    assert gap_small.max() > 1e-3 and gap_small.max() > 10 * gap_big.max(), (gap_small.max(), gap_big.max())


def test_aghq_approaches_laplace_for_large_groups_vector():
    big, fam, phi = simulate("logit", 4, 8000, 2, seed=3)
    small, _, _ = simulate("logit", 40, 5, 2, seed=4)
    gap_big = np.abs(_laplace_gap_per_group(big, fam, phi))
    gap_small = np.abs(_laplace_gap_per_group(small, fam, phi))
    assert gap_big.max() < 1e-3, gap_big
    assert gap_small.max() > 1e-3 and gap_small.max() > 10 * gap_big.max(), (gap_small.max(), gap_big.max())


# --- 4. independent computations of the value ------------------------------------------------------

def _logpmf(link, y, m, eta):
    """Full log f(y | η), written independently of fedglmm (stable in the tails)."""
    if link == "log":
        return stats.poisson.logpmf(y, np.exp(eta))
    if link == "logit":
        logp, logq = -np.logaddexp(0, -eta), -np.logaddexp(0, eta)
    elif link == "probit":
        logp, logq = special.log_ndtr(eta), special.log_ndtr(-eta)
    else:
        t = np.exp(eta)
        logp, logq = np.log(-np.expm1(-t)), -t
    comb = special.gammaln(m + 1) - special.gammaln(y + 1) - special.gammaln(m - y + 1)
    with np.errstate(invalid="ignore"):
        return comb + np.where(y == 0, 0.0, y * logp) + np.where(m == y, 0.0, (m - y) * logq)


def _eta_derivs(link, y, m, eta):
    """(∂ℓ/∂η, −∂²ℓ/∂η², Fisher weight m μ'² / V(μ)), written independently of fedglmm."""
    if link == "log":
        mu = np.exp(eta)
        return y - mu, mu, mu
    if link == "logit":
        p = special.expit(eta)
        return y - m * p, m * p * (1 - p), m * p * (1 - p)
    if link == "probit":
        l1 = np.exp(stats.norm.logpdf(eta) - stats.norm.logcdf(eta))       # φ/Φ
        l0 = np.exp(stats.norm.logpdf(eta) - stats.norm.logsf(eta))        # φ/(1 − Φ)
        return y * l1 - (m - y) * l0, y * l1 * (eta + l1) + (m - y) * l0 * (l0 - eta), m * l1 * l0
    t = np.exp(eta)                                                        # cloglog
    a = t / np.expm1(t)                                                    # t e^{−t} / (1 − e^{−t})
    # d/dη a = a (1 − t − a) ... so −ℓ'' = −y a (1 − t − a) + (m − y) t
    return y * a - (m - y) * t, -y * a * (1 - t - a) + (m - y) * t, m * t * a


@pytest.mark.parametrize("link, curvature", [("logit", "observed"), ("log", "observed"),
                                             ("probit", "observed"), ("probit", "expected"),
                                             ("cloglog", "observed"), ("cloglog", "expected")])
def test_laplace_equals_brute_force_for_one_group(link, curvature):
    """h(û) − ½ log det(I + MᵀWM) for one group of 8 rows with a vector random effect and an offset:
    û from scipy.optimize, W the observed (−∂²ℓ/∂η²) or Fisher weights (the same for logit and log)."""
    rng = np.random.default_rng(11)
    n = 8
    x = rng.normal(size=n)
    X = np.c_[np.ones(n), x]
    Z = X.copy()
    if link == "log":
        m = np.ones(n)
        y = rng.poisson(2.0, n).astype(float)
        fam = get_family("poisson")
    else:
        m = rng.integers(1, 6, n).astype(float)
        y = rng.binomial(m.astype(int), 0.4).astype(float)
        fam = get_family("binomial", link)
    off = rng.normal(0, 0.2, n)
    d = make_design(X, Z, y, np.zeros(n, int), trials=m, offset=off)
    beta, theta = np.array([-0.2, 0.4]), np.array([0.9, 0.3, 0.6])
    lam = np.array([[theta[0], 0.0], [theta[1], theta[2]]])
    M = Z @ lam
    eta0 = X @ beta + off

    def negh(u):
        return -(np.sum(_logpmf(link, y, m, eta0 + M @ u)) - 0.5 * u @ u)

    def negh_grad(u):
        return -(M.T @ _eta_derivs(link, y, m, eta0 + M @ u)[0] - u)

    def negh_hess(u):
        return np.eye(2) + M.T @ (_eta_derivs(link, y, m, eta0 + M @ u)[1][:, None] * M)

    res = optimize.minimize(negh, np.zeros(2), jac=negh_grad, hess=negh_hess, method="trust-exact",
                            options={"gtol": 1e-12})
    u = res.x
    for _ in range(3):              # polish: log det H is not stationary at û, so û must be exact
        u = u - np.linalg.solve(negh_hess(u), negh_grad(u))
    assert np.max(np.abs(negh_grad(u))) < 1e-12
    _, wobs, wfish = _eta_derivs(link, y, m, eta0 + M @ u)
    w = wobs if curvature == "observed" else wfish
    H = np.eye(2) + M.T @ (w[:, None] * M)
    brute = -negh(u) - 0.5 * np.linalg.slogdet(H)[1]
    lik = GLMMLikelihood(d, fam, 1, curvature=curvature)
    v, _, aux = lik.value_grad(np.r_[beta, theta], grad=False)
    assert v == pytest.approx(brute, rel=0, abs=1e-10)
    assert np.allclose(aux["u"][0], u, rtol=0, atol=1e-9)
    # the independent derivatives are right: differences of the independent log-density
    h = 1e-5
    e = eta0 + M @ u
    num1 = (_logpmf(link, y, m, e + h) - _logpmf(link, y, m, e - h)) / (2 * h)
    num2 = -(_logpmf(link, y, m, e + h) - 2 * _logpmf(link, y, m, e) + _logpmf(link, y, m, e - h)) / h**2
    assert np.allclose(_eta_derivs(link, y, m, e)[0], num1, rtol=1e-8, atol=1e-8)
    assert np.allclose(wobs, num2, rtol=1e-4, atol=1e-4)


def _quad_loglik(link, y, m, eta0, z, sigma):
    """log ∫ ∏ f(y_j | η0_j + z_j b) φ(b; 0, σ²) db by scipy.integrate.quad around the mode."""
    def logint(b):
        return np.sum(_logpmf(link, y, m, eta0 + z * b)) + stats.norm.logpdf(b, 0.0, sigma)

    res = optimize.minimize_scalar(lambda b: -logint(b), bracket=(-1.0, 1.0))
    bhat, top = res.x, logint(res.x)
    hh = 1e-4 * max(1.0, abs(bhat))
    curv = -(logint(bhat + hh) - 2 * top + logint(bhat - hh)) / hh**2
    s = 1.0 / np.sqrt(curv)
    val, err = integrate.quad(lambda b: np.exp(logint(b) - top), bhat - 40 * s, bhat + 40 * s,
                              points=[bhat], epsabs=0.0, epsrel=1e-13, limit=500)
    assert err < 1e-11 * val
    return top + np.log(val)


@pytest.mark.parametrize("link", ["logit", "probit", "cloglog", "log"])
def test_many_node_aghq_equals_quadrature(link):
    rng = np.random.default_rng({"logit": 1, "probit": 2, "cloglog": 3, "log": 4}[link])
    n = 6
    x = rng.normal(size=n)
    X = np.c_[np.ones(n), x]
    if link == "log":
        fam, m, y = get_family("poisson"), np.ones(n), rng.poisson(1.5, n).astype(float)
    else:
        fam = get_family("binomial", link)
        m = np.array([1, 1, 3, 1, 4, 2], float)
        y = np.minimum(rng.binomial(m.astype(int), 0.5), m).astype(float)
    d = make_design(X, np.ones((n, 1)), y, np.zeros(n, int), trials=m)
    beta, sigma = np.array([-0.3, 0.5]), 1.3
    lik = GLMMLikelihood(d, fam, 30)
    v = value(lik, np.r_[beta, sigma])
    ref = _quad_loglik(link, y, m, X @ beta, np.ones(n), sigma)
    assert abs(np.expm1(v - ref)) < 1e-8, (v, ref)


@pytest.mark.parametrize("link, nagq", [("logit", 5), ("log", 5), ("logit", 30), ("log", 30)])
def test_large_group_with_extreme_eta_stays_finite(link, nagq):
    """A 500-row group whose log-integrand at the nodes is ~ ±1e4..1e6: no overflow, no log(0)."""
    rng = np.random.default_rng(5)
    n = 500
    x = rng.uniform(-1, 1, n)
    X = np.c_[np.ones(n), x]
    if link == "logit":
        beta = np.array([0.0, 40.0])                                  # |η| up to 40
        fam = get_family("binomial")
        p = special.expit(X @ beta)
        y = (rng.uniform(size=n) < np.where(rng.uniform(size=n) < 0.2, 1 - p, p)).astype(float)  # misfits
    else:
        beta = np.array([6.0, 1.0])                                   # counts in the hundreds and thousands
        fam = get_family("poisson")
        y = rng.poisson(np.exp(X @ beta + 0.3)).astype(float)
    m = np.ones(n)
    d = make_design(X, np.ones((n, 1)), y, np.zeros(n, int), trials=m)
    lik = GLMMLikelihood(d, fam, nagq)
    beta = beta + np.array([0.01, -0.02])            # off the optimum: a gradient well above rounding
    phi = np.r_[beta, 0.5]
    v, g, _ = lik.value_grad(phi)
    assert np.isfinite(v) and np.all(np.isfinite(g))
    a_scale = np.abs(np.sum(fam.loglik(y, m, X @ beta)))
    assert a_scale > 1000, a_scale                   # exp() of the log-integrand would over/underflow
    ref = _quad_loglik(link, y, m, X @ beta, np.ones(n), 0.5)
    assert v == pytest.approx(ref, rel=1e-10)
    assert_grad_close(g, fd_gradient(lik, phi), f"{link} extreme")


# --- 5. gaussian: LMMSums and the profiled deviance ------------------------------------------------

LMMS = {      # sleepstudy is balanced (β̂ does not move with θ there); sim_gauss_factor is not
    "corr": ("sleepstudy", "Reaction ~ Days + (Days | Subject)", [0.9, 0.05, 0.25]),
    "uncorr": ("sleepstudy", "Reaction ~ Days + (Days || Subject)", [0.9, 0.25]),
    "int": ("sleepstudy", "Reaction ~ Days + (1 | Subject)", [0.8]),
    "corr3": ("sleepstudy", "Reaction ~ Days + (1 + Days + I(Days**2) | Subject)",
              [0.9, 0.1, 0.3, -0.05, 0.02, 0.04]),
    "factor-corr": ("extra_sim_gauss_factor", "y ~ x * f + (1 + x | g)", [0.7, 0.2, 0.4]),
    "factor-uncorr": ("extra_sim_gauss_factor", "y ~ x * f + (x || g)", [0.7, 0.4]),
}


def lmm(key):
    name, formula, theta = LMMS[key]
    d, _ = load(name, formula, "gaussian")
    return LMMSums(d), np.array(theta, float), d


def _five_point(f, x, t, h):
    """d f / d x_t by the five-point central stencil (error O(h⁴))."""
    def at(k):
        e = np.zeros(len(x))
        e[t] = k * h
        return f(x + e)
    return (8 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12 * h)


@pytest.mark.parametrize("key", list(LMMS))
def test_lmm_sums_derivatives(key):
    sums, theta, _ = lmm(key)
    out = sums.evaluate(theta, order=2)
    k = len(theta)
    h = 1e-4
    for name in ("A", "b", "c", "d"):
        first = np.asarray(out["d" + name])
        second = np.asarray(out["d2" + name])
        for t in range(k):
            num1 = _five_point(lambda th: np.asarray(sums.evaluate(th, order=0)[name], float), theta, t, h)
            num2 = _five_point(lambda th: np.asarray(sums.evaluate(th, order=1)["d" + name], float), theta, t, h)
            scale1 = np.max(np.abs(first)) or 1.0
            scale2 = np.max(np.abs(second)) or 1.0
            assert np.allclose(first[t], num1, rtol=RTOL, atol=RTOL * 1e-2 * scale1), (key, name, t, first[t], num1)
            assert np.allclose(second[:, t], num2, rtol=RTOL, atol=RTOL * 1e-2 * scale2), (key, name, t)
        assert np.allclose(second, np.swapaxes(second, 0, 1), rtol=1e-10, atol=1e-10 * (np.max(np.abs(second)) or 1))


@pytest.mark.parametrize("reml", [False, True], ids=["ML", "REML"])
@pytest.mark.parametrize("key", list(LMMS))
def test_profiled_deviance_gradient_and_hessian(key, reml):
    sums, theta, _ = lmm(key)

    def dev(th, order=0):
        return profiled_deviance(sums.evaluate(th, order=max(order, 0)), reml=reml, order=order)

    p = dev(theta, 2)
    h = 1e-4
    num_g = np.array([_five_point(lambda th: np.array(dev(th).dev), theta, t, h) for t in range(len(theta))])
    num_h = np.column_stack([_five_point(lambda th: dev(th, 1).grad, theta, t, h) for t in range(len(theta))])
    assert_grad_close(p.grad, num_g, f"{key} reml={reml} gradient")
    assert_hess_close(p.hess, num_h, f"{key} reml={reml} Hessian")
    # dβ̂/dθ and dσ̂²/dθ that come along
    num_b = np.array([_five_point(lambda th: dev(th).beta, theta, t, h) for t in range(len(theta))])
    num_s = np.array([_five_point(lambda th: np.array(dev(th).sigma2), theta, t, h) for t in range(len(theta))])
    assert np.allclose(p.dbeta, num_b, rtol=RTOL, atol=1e-9 * np.max(np.abs(p.beta)))
    assert np.allclose(p.dsigma2, num_s, rtol=RTOL, atol=1e-9 * p.sigma2)


def _mvn_loglik(d: Design, lam, beta, sigma2):
    """Σ_i log N(y_i; X_i β, σ² (I + Z_i ΛΛᵀ Z_iᵀ)) with scipy."""
    total = 0.0
    ends = np.r_[d.starts[1:], d.n]
    for a, b in zip(d.starts, ends):
        Zi = d.Z[a:b]
        V = sigma2 * (np.eye(b - a) + Zi @ lam @ lam.T @ Zi.T)
        total += stats.multivariate_normal.logpdf(d.y[a:b] - d.offset[a:b], d.X[a:b] @ beta, V)
    return total


@pytest.mark.parametrize("key", list(LMMS))
def test_ml_deviance_is_minus_twice_the_normal_log_density(key):
    sums, theta, d = lmm(key)
    p = profiled_deviance(sums.evaluate(theta, order=0), reml=False, order=0)
    lam = sums.lam(theta)
    # β̂ and σ̂² are the maximisers at this θ: GLS and RSS / n
    assert p.dev == pytest.approx(-2 * _mvn_loglik(d, lam, p.beta, p.sigma2), rel=1e-12)
    for db, ds in ((0.01, 1.0), (0.0, 1.05), (0.0, 0.95)):
        assert p.dev < -2 * _mvn_loglik(d, lam, p.beta + db, ds * p.sigma2)


@pytest.mark.parametrize("key", list(LMMS))
def test_reml_deviance_is_the_restricted_normal_log_density(key):
    """−2ℓ_R = −2ℓ(β̂, σ̂²) + log det(XᵀV⁻¹X / σ̂²) − p log 2π, σ̂² = RSS / (n − p)."""
    sums, theta, d = lmm(key)
    p = profiled_deviance(sums.evaluate(theta, order=0), reml=True, order=0)
    lam = sums.lam(theta)
    A = np.zeros((d.X.shape[1],) * 2)
    ends = np.r_[d.starts[1:], d.n]
    for a, b in zip(d.starts, ends):
        Vi = np.eye(b - a) + d.Z[a:b] @ lam @ lam.T @ d.Z[a:b].T
        A += d.X[a:b].T @ np.linalg.solve(Vi, d.X[a:b])
    npar = d.X.shape[1]
    want = -2 * _mvn_loglik(d, lam, p.beta, p.sigma2) + np.linalg.slogdet(A / p.sigma2)[1] \
        - npar * np.log(2 * np.pi)
    assert p.dev == pytest.approx(want, rel=1e-12)


def test_lmm_sums_add_over_sites():
    """A, b, c, d and their derivatives of two halves (by subject) sum to the pooled ones."""
    sums, theta, d = lmm("corr")
    cut = d.starts[9]
    halves = [Design(y=d.y[s], trials=d.trials[s], offset=d.offset[s], X=d.X[s], Z=d.Z[s],
                     group=d.group[s] - d.group[s][0], group_levels=[], x_names=d.x_names, z_names=d.z_names,
                     theta_mask=d.theta_mask) for s in (slice(0, cut), slice(cut, d.n))]
    parts = [LMMSums(h).evaluate(theta) for h in halves]
    whole = sums.evaluate(theta)
    for key in ("A", "b", "c", "d", "dA", "db", "dc", "dd", "d2A", "d2b", "d2c", "d2d"):
        assert np.allclose(np.asarray(parts[0][key]) + np.asarray(parts[1][key]), whole[key], rtol=1e-10,
                           atol=1e-10 * np.max(np.abs(whole[key]))), key


def test_modes_restart_from_zero_when_the_warm_start_is_off_scale():
    """The modes of the last point visited start the next evaluation; when they are far off scale for
    the new θ (exp(η) overflows) the site restarts them from zero instead of failing the round."""
    lik, phi = model("pois-offset-slope", 1)
    cold = lik.evaluate(phi)
    lik.u = np.full_like(lik.u, 120.0)
    warm = lik.evaluate(phi)
    assert np.isfinite(warm.value) and warm.value == pytest.approx(cold.value, rel=1e-10)
    np.testing.assert_allclose(warm.grad, cold.grad, rtol=1e-6, atol=1e-8)


def test_a_point_that_cannot_be_evaluated_gives_nan_not_an_error():
    """exp(η) overflows everywhere: the reply is NaN (the optimiser steps back), and the next evaluation
    still starts from the last good modes."""
    lik, phi = model("pois-offset-int", 1)
    good = lik.evaluate(phi)
    modes = lik.u.copy()
    bad = lik.evaluate(phi + np.r_[800.0, np.zeros(len(phi) - 1)])
    assert np.isnan(bad.value) and np.all(np.isnan(bad.grad)) and np.all(np.isnan(bad.hess))
    np.testing.assert_array_equal(lik.u, modes)
    assert lik.evaluate(phi).value == pytest.approx(good.value, rel=1e-12)
