"""A final round of a GLMM with levels shared by sites: the third derivatives of ℓ from its own points and its
Hessian moved to the tangent it found (``coordinator/shared_third.py``), against the pooled engine's
log-likelihood on all rows (its gradient differenced twice); and a split fit that ends on them -- one final
round, no round to settle the last step -- with the pooled fit's estimates and standard errors."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from test_likelihood import fd_hessian
from test_shared_glmm import _engines, _LocalRounds, _simulated

import fedglmm
from fedglmm.coordinator import shared_glmm_rounds as rounds_module
from fedglmm.coordinator.shared_glmm_rounds import SharedGLMMEvaluator
from fedglmm.likelihood.glmm_shared import GLMM_SHARED_KEYS

PHI = np.r_[-0.2, 0.4, 0.7, 0.6, 0.2, 0.3]


def _evaluator(engines, pool):
    ev = SharedGLMMEvaluator.__new__(SharedGLMMEvaluator)
    ev.rounds, ev.settle, ev.patient = _LocalRounds(engines), 0.5, False
    ev.layout, ev.pool, ev.seen = pool.layout, pool, []
    ev.rounds.Q = pool.Q
    ev._shared_modes = lambda pt, D: {}
    return ev


def _pooled_hessian(pooled, phi, d=1e-4):
    """The pooled engine's Hessian of ℓ by central differences of its gradient (symmetrised)."""
    H = fd_hessian(pooled, phi, d)
    return 0.5 * (H + H.T)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_third_derivatives_of_a_settled_final_round_are_the_pooled_ones(family):
    """A final round planned from a point at its φ with v at its mode (τ and Γ̂ predicted to ~1e-10) brings
    T (of −ℓ) equal to central differences of the pooled engine's Hessian, entries with three distinct
    indices (from the mixed points) as the rest; a round planned from far does not bring it."""
    engines, pool, pooled = _engines(_simulated(family, seed=5), family)
    ev = _evaluator(engines, pool)
    ev.settle, ev.patient = 1e-14, True
    ev.evaluate([PHI], None)                     # a round's point at PHI, v at its mode
    s, _ = ev.finalize(PHI, None)                # planned from it
    plan = ev._plan(PHI + 0.05, final=True)      # ... and from there at another φ: no T
    totals = ev.rounds.evaluate(plan["psis"], GLMM_SHARED_KEYS, {"gammas": np.asarray(plan["gammas"])})
    assert "third" not in ev._digest(plan, totals)[2]
    T = -np.asarray(s["third"])
    P, d = len(PHI), 1e-3
    ref = np.empty((P, P, P))
    for k in range(P):
        e = np.zeros(P)
        e[k] = d
        ref[:, :, k] = (_pooled_hessian(pooled, PHI + e) - _pooled_hessian(pooled, PHI - e)) / (2 * d)
    scale = np.abs(ref).max()
    assert np.abs(T - ref).max() < 1e-4 * scale
    distinct = [(a, b, c) for a in range(P) for b in range(a + 1, P) for c in range(b + 1, P)]
    assert max(abs(T[i] - ref[i]) for i in distinct) < 1e-4 * scale
    assert max(abs(ref[i]) for i in distinct) > 1e-2 * scale          # (they are not all ~0 here)
    assert np.allclose(s["hess"], _pooled_hessian(pooled, PHI), rtol=0, atol=1e-6 * np.abs(s["hess"]).max())


def test_hessian_moved_from_the_predicted_tangent_to_the_found_one():
    """The Hessian's columns are differences along the tangent predicted before the round; with that
    prediction off by 1e-3 (relative; Γ̂ predicted as a round does, from the point before) a final round's
    Hessian, moved to the tangent the round found, is the pooled one to 1.7e-7 of its size, where the
    differences alone are off by 2.9e-5 (1e-4: 1.6e-8 against 2.9e-6; the error left is of second order)."""
    engines, pool, pooled = _engines(_simulated("binomial", seed=5), "binomial")
    ev = _evaluator(engines, pool)
    ev.finalize(PHI, None)
    ev.finalize(PHI, None)
    base = ev.seen[-1]
    W = 1e-3 * np.abs(base.tau).max() * np.random.default_rng(1).normal(size=base.tau.shape)
    ref = _pooled_hessian(pooled, PHI)
    errors = {}
    for final in (False, True):
        plan = ev._plan(PHI, base.v + base.dv, None, replace(base, tau=base.tau + W), final=final)
        totals = ev.rounds.evaluate(plan["psis"], GLMM_SHARED_KEYS, {"gammas": np.asarray(plan["gammas"])})
        errors[final] = np.abs(ev._digest(plan, totals)[2]["hess"] - ref).max() / np.abs(ref).max()
    assert errors[False] > 1e-5
    assert errors[True] < 0.01 * errors[False]


def _split_fit(monkeypatch):
    rng = np.random.default_rng(4)
    n, G, K = 600, 30, 5
    g, x = rng.integers(0, G, n), rng.normal(size=n)
    y = rng.poisson(np.exp(1.0 + 0.5 * x + rng.normal(0, 0.8, G)[g]))
    df = pd.DataFrame({"y": y, "x": x, "g": [f"h{k}" for k in g]})
    site = rng.integers(0, K, n)
    sites = {f"s{k}": df[site == k].reset_index(drop=True) for k in range(K)}
    finals = []
    orig = SharedGLMMEvaluator.finalize
    monkeypatch.setattr(SharedGLMMEvaluator, "finalize",
                        lambda self, *a, **k: finals.append(1) or orig(self, *a, **k))
    res = fedglmm.fit("y ~ x + (1|g)", sites, family="poisson")
    return res, fedglmm.fit("y ~ x + (1|g)", df, family="poisson"), len(finals)


def test_a_split_fit_ends_on_its_final_round(monkeypatch):
    """Every level at every site (5 sites, 30 levels, poisson): the final round (repeated at the estimate until
    v and Γ̂ are settled there) brings T, the last step is taken to third order and the information moved
    along it -- no final round after it (there was one before: below) -- with the pooled fit's logLik,
    estimates and standard errors."""
    res, pooled, finals = _split_fit(monkeypatch)
    assert finals == 1
    assert abs(res.loglik - pooled.loglik) < 1e-9
    assert np.allclose(res.fixef, pooled.fixef, rtol=0, atol=1e-9)
    assert np.allclose(res.se, pooled.se, rtol=1e-8, atol=0)
    assert np.allclose(res.theta, pooled.theta, rtol=0, atol=1e-8)


def test_without_the_third_derivatives_the_last_step_takes_a_round(monkeypatch):
    """The same fit with the final round's T withheld settles its last step by one more final round."""
    monkeypatch.setattr(rounds_module, "trusted", lambda *a: False)
    res, pooled, finals = _split_fit(monkeypatch)
    assert finals == 2
    assert np.allclose(res.se, pooled.se, rtol=1e-8, atol=0)
