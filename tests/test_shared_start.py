"""Where the shared effects v of a GLMM with levels at several sites start, and when a final point is
settled (:mod:`fedglmm.coordinator.shared_ends`): the grid's bracket of each level's mode against the exact
root, the pseudo-data fit's modes as v's start, the final gradient's check of Γ̂, and fits over sites that
take fewer rounds and equal the pooled ones."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.coordinator.shared_ends import bracketed, gradient_settled

GRID = (0.0, -4.0, -2.0, -1.0, 1.0, 2.0, 4.0)       # v = 0 and the first round's grid


def _poisson_levels(L: int = 40, seed: int = 0):
    """Levels whose F_v(t) = S − M e^t − t (a poisson level's intercept, its prior N(0, 1)) and C = M e^t + 1,
    with roots t* spread over the grid, as the points of a first round (v = t at every level)."""
    rng = np.random.default_rng(seed)
    M, tstar = np.exp(rng.uniform(1.0, 5.0, L)), rng.uniform(-3.0, 3.0, L)
    S = M * np.exp(tstar) + tstar

    def point(t):
        v = np.full(L, t)
        C = M * np.exp(v) + 1.0
        return SimpleNamespace(v=v, dv=(S - M * np.exp(v) - v) / C, C=np.diag(C), tau=np.zeros((L, 2)))

    return [point(t) for t in GRID], M, tstar


def test_the_grid_brackets_each_levels_mode():
    """The bracket's root lands 10 times closer to each level's mode than Newton's step from the nearest
    grid point (the decrement it leaves, summed over the levels, 30 times smaller), and C there within
    6 % of C at the mode (its diagonal interpolated geometrically)."""
    pts, M, tstar = _poisson_levels()
    levels, v, C, tau = bracketed(pts, np.arange(len(tstar))[:, None])
    assert len(levels) == len(tstar) and tau.shape == (len(tstar), 1, 2)
    c_star = M * np.exp(tstar) + 1.0
    miss = v[:, 0] - tstar
    near = np.array([min(GRID, key=lambda t: abs(t - ts)) for ts in tstar])
    newton = near + (c_star - 1.0 + tstar - M * np.exp(near) - near) / (M * np.exp(near) + 1.0) - tstar
    assert np.abs(miss).max() < 0.1 * np.abs(newton).max()
    assert np.sum(c_star * miss**2) < np.sum(c_star * newton**2) / 30.0
    assert np.abs(C[:, 0, 0] / c_star - 1.0).max() < 0.06


def test_no_bracket_without_a_sign_change():
    """A level whose gradient keeps its sign over the grid (its mode beyond 4) gets no bracket."""
    pts, _, _ = _poisson_levels(L=3)
    for p in pts:
        p.dv = np.abs(p.dv) + 1.0                     # F_v > 0 everywhere: the mode lies beyond the grid
    assert bracketed(pts, np.arange(3)[:, None]) is None


def test_final_gradient_needs_a_good_prediction_of_gamma():
    """The part of the final gradient contracted with Γ̂ (∂ log det C along τ − τ̄): with Γ̂ off by 1e-3 and
    the tangent 0.5 from its prediction it moves the last step by more than the tolerance; exact, not."""
    rng = np.random.default_rng(1)
    Q, P = 5, 3
    G = rng.normal(size=(Q, Q))
    pt = SimpleNamespace(Gamma=G @ G.T + np.eye(Q), tau=rng.normal(size=(Q, P)), ldc_v=rng.normal(size=Q))
    taubar = pt.tau + 0.5
    hess = -np.diag([7.0, 21.0, 7.0])
    assert gradient_settled(pt, taubar, pt.Gamma, hess, 1e-14)
    assert not gradient_settled(pt, taubar, pt.Gamma * (1 + 1e-3), hess, 1e-14)
    assert gradient_settled(pt, pt.tau, pt.Gamma * (1 + 1e-3), hess, 1e-14)       # τ̄ = τ: nothing left to Γ̂


def _shared(seed, n=600, G=30, K=5, mu=1.0, family="poisson", sd=0.8):
    """Counts or binary outcomes in G levels, every level at each of K sites (rows dealt at random)."""
    rng = np.random.default_rng(seed)
    g, x = rng.integers(0, G, n), rng.normal(size=n)
    eta = mu + 0.5 * x + rng.normal(0, sd, G)[g]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y, "x": x, "g": [f"h{k}" for k in g]})
    site = rng.integers(0, K, n)
    return df, {f"s{k}": df[site == k].reset_index(drop=True) for k in range(K)}


def test_split_fits_take_fewer_rounds_and_equal_the_pooled_ones():
    """Poisson and binary levels split over 5 sites (each level's rows at every site, too few for their
    moments to leave), seeds 0-5: 78 rounds in all before the start's v was bracketed and every start
    tried (6-8 a fit), 72 with them; 83 since a last step longer than 1e-7 in the Hessian's norm is settled
    by one more final round (for the standard errors: test_standard_errors_with_shared_levels_equal_the_pooled_ones);
    each fit equal to the pooled one (logLik to 1e-8)."""
    rounds = []
    for seed in range(6):
        for family in ("poisson", "binomial"):
            df, sites = _shared(seed, family=family)
            pooled = fedglmm.fit("y ~ x + (1|g)", df, family=family)
            split = fedglmm.fit("y ~ x + (1|g)", sites, family=family)
            assert split.converged and abs(split.loglik - pooled.loglik) < 1e-8
            # (the fixed effects to 1e-7 of their SE: the stopping rule's own slack, 1.2e-8 relative on the
            # binary draw of seed 1, which stops at a decrement of 3.7e-7 whose contraction predicts 8e-15)
            assert np.all(np.abs(split.fixef - pooled.fixef) / pooled.se < 1e-7)
            rounds.append(split.rounds)
    assert sum(rounds) <= 83, rounds


def test_pseudo_data_modes_start_v(monkeypatch):
    """Where every level's moments went (few large cells), the pseudo-data fit's modes and conditional SDs
    start v: fewer rounds than from v = 0 and the grid, the same fit."""
    from fedglmm.likelihood import fit
    from fedglmm.methods import hybrid

    # (the rounds to the estimate: a last step settled by one more final round comes with that step's length,
    # whatever the start -- here with the modes alone, 6 + 1 against 7 -- so the comparison goes without it)
    monkeypatch.setattr(fit, "BARE_SETTLE", np.inf)
    df, sites = _shared(3, n=1500, G=8, K=2, sd=1.5)
    formula = "y ~ 0 + x + (1|g)"
    with_modes = fedglmm.fit(formula, sites, family="poisson")
    monkeypatch.setattr(hybrid, "_level_modes", lambda pseudo: None)
    without = fedglmm.fit(formula, sites, family="poisson")
    assert with_modes.rounds < without.rounds
    assert abs(with_modes.loglik - without.loglik) < 1e-8
    assert np.allclose(with_modes.fixef, without.fixef, rtol=0, atol=1e-8)


def test_the_lowest_start_is_kept_where_another_leads_to_a_local_optimum():
    """Rare binary outcomes in 200 levels over 3 sites (benchmarks/stress_shared.py --wide, draw 4): the lowest
    start has an indefinite Hessian, and a start with a positive definite one, 1.4 higher, led the Newton
    rounds to a local optimum at SD 0, 5.6 below the pooled logLik.  The shared-level path goes on from the
    lowest start, and reaches the pooled optimum (an SD of 6.6)."""
    rng = np.random.default_rng(1004)
    G, n, K = int(rng.choice([20, 60, 200])), int(rng.choice([800, 3000])), int(rng.choice([3, 6]))
    rng.choice(2), rng.choice(3), rng.choice(3)             # (the draw's family, SD and intercept: as below)
    assert (G, n, K) == (200, 800, 3)
    g, x, z = rng.integers(0, G, n), rng.normal(size=n), rng.binomial(1, 0.4, n)
    eta = -4.0 + 0.4 * x - 0.3 * z + rng.normal(0, 0.5, G)[g]
    df = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "z": z, "g": [f"l{k}" for k in g]})
    site = rng.integers(0, K, n)
    sites = {f"s{k}": df[site == k].reset_index(drop=True) for k in range(K)}
    pooled = fedglmm.fit("y ~ x + z + (1 | g)", df, family="binomial")
    split = fedglmm.fit("y ~ x + z + (1 | g)", sites, family="binomial")
    assert split.converged and abs(split.loglik - pooled.loglik) < 1e-8
    assert np.all(np.abs(split.fixef - pooled.fixef) / pooled.se < 1e-6)


def test_standard_errors_with_shared_levels_equal_the_pooled_ones():
    """Fit 1 of benchmarks/stress_shared.py (poisson ``y ~ x + (1|g)``, 30 levels each at 4-5 of 5 sites): the
    split fit's estimates, logLik and standard errors equal the pooled fit's, the last to 1e-7 relative.  The
    intercept's was 3.3e-5 off while the fit ended on a last step of 3e-4 in the Hessian's norm (the final
    point's Hessian, from differences of gradients, has no third derivatives to move it to the estimate): such
    a step is now settled by one more final round (likelihood.fit.BARE_SETTLE)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from stress_shared import draw

    fam, formula, _, G, K, *_, df, sites = draw(1)
    assert (fam, formula, G, K) == ("poisson", "y ~ x + (1|g)", 30, 5)
    pooled = fedglmm.fit(formula, df, family=fam)
    split = fedglmm.fit(formula, sites, family=fam)
    assert abs(split.loglik - pooled.loglik) < 1e-8
    assert np.allclose(split.fixef, pooled.fixef, rtol=0, atol=1e-7)
    assert np.allclose(split.se, pooled.se, rtol=1e-7, atol=0), np.asarray(split.se) / np.asarray(pooled.se) - 1
