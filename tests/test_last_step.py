"""The last step to the solution and the steps in the covariance's entries (likelihood/last_step.py,
likelihood/covariance_steps.py): checked on functions with known minima, and on fits whose objective is far
from quadratic at the optimum against the same fit continued to machine precision."""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.likelihood.covariance_steps import CovarianceSteps
from fedglmm.likelihood.last_step import third_order
from fedglmm.model.options import NewtonConfig
from multilevel_reference import cases as multilevel_cases
from multilevel_reference import fit as multilevel_fit
from multilevel_reference import split_sites

MASK = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)    # (1 + x | g) and a scalar term


def _derivatives(f, x, h=1e-4):
    """Gradient and Hessian of f at x by central differences (f smooth: polynomial here)."""
    n = len(x)
    E = np.eye(n) * h
    g = np.array([(f(x + E[i]) - f(x - E[i])) / (2 * h) for i in range(n)])
    H = np.array([[(f(x + E[i] + E[j]) - f(x + E[i] - E[j]) - f(x - E[i] + E[j]) + f(x - E[i] - E[j]))
                   / (4 * h * h) for j in range(n)] for i in range(n)])
    return g, 0.5 * (H + H.T)


def test_covariance_map_is_one_to_one():
    cs = CovarianceSteps(MASK, p=2)
    x = np.array([0.3, -1.0, 0.7, -0.4, 0.2, 1.3])      # β (2), θ (Λ₁₁, Λ₂₁, Λ₂₂, Λ₃₃)
    y = cs.to_inner(x)
    assert np.allclose(y[:2], x[:2])
    assert np.allclose(y[2:], [0.49, -0.28, 0.16 + 0.04, 1.69])
    assert np.allclose(cs.from_inner(y), x, atol=1e-14)
    y[4] = 0.1                                          # Σ₂₂ < Σ₂₁²/Σ₁₁: not positive definite
    assert cs.from_inner(y) is None


def test_covariance_step_lands_on_a_minimum_quadratic_in_sigma():
    """F quadratic in (β, Σ's entries): one step in Σ reaches its minimum, where Newton in θ does not."""
    cs = CovarianceSteps(MASK, p=2)
    rng = np.random.default_rng(3)
    A = rng.normal(size=(6, 6))
    Q = A @ A.T + 6 * np.eye(6)
    y_star = cs.to_inner(np.array([0.5, 0.1, 0.4, -0.38, 0.05, 0.9]))   # correlation −0.99: nearly singular
    F = lambda x: 0.5 * (cs.to_inner(x) - y_star) @ Q @ (cs.to_inner(x) - y_star)   # noqa: E731
    x = np.array([0.3, 0.0, 0.6, -0.2, 0.4, 1.2])
    g, H = _derivatives(F, x)
    step, pred = cs.step(x, g, H)
    assert np.allclose(cs.to_inner(x + step), y_star, atol=1e-5)
    assert pred == pytest.approx(F(x), rel=1e-4)
    newton = -np.linalg.solve(H, g)
    assert F(x + newton) > 1e3 * F(x + step)


def test_predicted_gradient_of_the_covariance_model_is_exact_for_that_model():
    cs = CovarianceSteps(MASK, p=2)
    y_star = cs.to_inner(np.array([0.5, 0.1, 0.4, -0.3, 0.2, 0.9]))
    F = lambda x: float(np.sum((cs.to_inner(x) - y_star) ** 2))   # noqa: E731
    x, other = np.array([0.3, 0.0, 0.6, -0.2, 0.4, 1.2]), np.array([0.35, 0.05, 0.5, -0.25, 0.3, 1.0])
    g, H = _derivatives(F, x)
    g_other, _ = _derivatives(F, other)
    assert np.allclose(cs.predicted_gradient(x, g, H, other, g_other), g_other, atol=1e-5)


def test_third_order_step_on_a_cubic():
    """f = x²/2 + x³ (minimum at 0): from x = 0.01, Newton leaves an error of 3·x² = 2.8e-4; the step
    corrected with the Hessian's change since the previous point leaves one of third order (1.6e-5)."""
    f1, f2 = (lambda x: x + 3 * x * x), (lambda x: 1 + 6 * x)
    prev, x = 0.02, 0.01
    state = lambda z: SimpleNamespace(x=np.array([z]), g=np.array([f1(z)]), H=np.array([[f2(z)]]))  # noqa: E731
    newton = -f1(x) / f2(x)
    corrected = third_order(state(x), state(prev), np.array([newton]))[0]
    assert abs(x + newton) > 5e-5
    assert abs(x + corrected) < 0.1 * abs(x + newton)


def _near_singular_data(seed=11):
    """A logistic model with a random slope whose correlation with the intercept is close to −1."""
    rng = np.random.default_rng(seed)
    G = 60
    g = np.repeat(np.arange(G), rng.integers(10, 50, G))
    x1 = rng.normal(size=g.size)
    b1 = rng.normal(0, 0.5, G)
    b0 = -0.2 * b1 + rng.normal(0, 0.02, G)
    eta = -1.0 + 0.5 * x1 + b0[g] + b1[g] * x1
    y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    df = pd.DataFrame({"y": y, "x1": x1, "g": g})
    return {f"s{j}": df[df.g % 2 == j] for j in range(2)}


def _within(res, opt, tol=1e-8):
    for a, b in ((res.fixef, opt.fixef), (res.theta, opt.theta)):
        a, b = np.asarray(a, float), np.asarray(b, float)
        assert np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))) < tol, (a, b)


def test_fits_far_from_quadratic_end_at_the_optimum():
    """cbpp with an observation-level effect (the Newton step's error was 2e-7 relative) and a nearly
    singular random-slope covariance: both methods within 1e-8 of the fit continued to machine precision."""
    warnings.simplefilter("ignore")
    case = next(c for c in multilevel_cases() if c["name"] == "cbpp_olre")
    opt = multilevel_fit(case, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6, max_evals=60))
    for method in ("hybrid", "iterative"):
        _within(multilevel_fit(case, method=method), opt)
    data = _near_singular_data()
    opt = fedglmm.fit("y ~ x1 + (1 + x1 | g)", data, family="binomial", method="iterative",
                      newton=NewtonConfig(tol=1e-16, near=1e-6, max_evals=60))
    t = np.asarray(opt.theta, float)                    # Λ = [[t₀, 0], [t₁, t₂]]: the correlation t₁/√(t₁² + t₂²)
    assert abs(t[1]) / np.hypot(t[1], t[2]) > 0.9
    for method in ("hybrid", "iterative"):
        _within(fedglmm.fit("y ~ x1 + (1 + x1 | g)", data, family="binomial", method=method), opt)


@pytest.mark.filterwarnings("ignore")
def test_standard_errors_far_from_quadratic_are_the_continued_fits():
    """cbpp with an observation-level effect, where F is far from quadratic (a Newton step from 8e-6 left
    1.2e-8 where the contraction before predicted 2e-10): the standard errors of the hybrid over 3 sites and of
    the iterative fit of the pooled rows within 1e-8 (relative) of the fit continued to machine precision.  Before,
    7.8e-8 and 8.5e-8: the hybrid's final round brought third derivatives it did not use for the next final
    step, and the iterative fit's last final point asked for none (a landing of 1e-17 predicted, 1.2e-11 found)."""
    case = next(c for c in multilevel_cases() if c["name"] == "cbpp_olre")
    opt = multilevel_fit(case, method="iterative", newton=NewtonConfig(tol=1e-22, near=1e-12, max_evals=60))
    for res in (multilevel_fit(case, split_sites(case, 3)), multilevel_fit(case, method="iterative")):
        _within(res, opt)
        assert np.allclose(res.se, opt.se, rtol=1e-8, atol=0), np.max(np.abs(res.se / opt.se - 1))


@pytest.mark.parametrize("formula, data", [("Reaction ~ Days + (Days | Subject)", "sleepstudy"),
                                           ("y ~ x * f + (1 | g)", "extra_sim_gauss_factor")])
def test_gaussian_estimates_move_with_the_last_step(formula, data):
    """A linear mixed model's β̂, σ̂², standard errors and REML criterion are moved along θ's last step (they
    were taken at the last point: β up to 5e-7 and SEs 4e-5 from the continued fit)."""
    df = pd.read_csv(Path(__file__).parent / "data" / f"{data}.csv")
    opt = fedglmm.fit(formula, df, method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6, max_evals=60))
    for method in ("iterative", "hybrid"):
        res = fedglmm.fit(formula, df, method=method)
        _within(res, opt)
        assert np.allclose(res.se, opt.se, rtol=1e-8, atol=0)
        assert res.loglik == pytest.approx(opt.loglik, rel=1e-12)
