"""Simulation settings of the seed study (s1-s8) and the extra settings."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fedglmm.simulate import BETA, COVARIATES, SETTINGS, Setting, formula, random_effects, simulate, \
    train_validation

GRID = {"s1": (2, 500, 1), "s2": (2, 500, 4), "s3": (10, 500, 1), "s4": (10, 500, 4),
        "s5": (2, 30, 1), "s6": (2, 30, 4), "s7": (10, 30, 1), "s8": (10, 30, 4)}


@pytest.mark.parametrize("name", GRID)
def test_seed_grid(name):
    s = SETTINGS[name]
    assert (s.sites, s.patients, s.intercept_var) == GRID[name]
    assert s.family == "binomial" and s.beta == BETA and s.slope_sd == 0
    frames = simulate(name, seed=1)
    assert list(frames) == [f"site{i}" for i in range(1, s.sites + 1)]
    for sid, df in frames.items():
        assert list(df.columns) == ["y", *COVARIATES, "site"]
        assert len(df) == s.patients and (df["site"] == sid).all()
        assert set(np.unique(df["y"])) <= {0, 1}
        assert df[["X1", "X2", "X3", "X4"]].isin([0, 1]).all().all()
        u = df[list(COVARIATES[4:])].to_numpy()
        assert u.min() >= -1 and u.max() <= 1.5


def test_settings_and_formula():
    assert set(SETTINGS) == set(GRID) | {"pois", "gauss", "nested", "many"}
    assert SETTINGS["pois"].family == "poisson"
    np.testing.assert_allclose(SETTINGS["pois"].beta, 0.5 * np.array(BETA))
    assert SETTINGS["gauss"].family == "gaussian" and SETTINGS["gauss"].sigma == 1
    nested = SETTINGS["nested"]
    assert (nested.slope_sd, nested.slope_corr, nested.slope_on) == (0.5, 0.3, "X5")
    assert (SETTINGS["many"].sites, SETTINGS["many"].patients) == (50, 100)
    xs = " + ".join(f"X{j}" for j in range(1, 11))
    assert formula("s1") == f"y ~ 0 + {xs} + (1 | site)"
    assert formula("nested") == f"y ~ 0 + {xs} + (1 + X5 | site)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        SETTINGS["s1"].sites = 3
    with pytest.raises(ValueError):
        Setting(sites=2, patients=10, intercept_var=1, family="gamma")
    with pytest.raises(KeyError):
        simulate("s9")


def test_deterministic_for_a_seed():
    a, b, c = simulate("s7", seed=5), simulate("s7", seed=5), simulate("s7", seed=6)
    for sid in a:
        pd.testing.assert_frame_equal(a[sid], b[sid])
    assert not all(a[sid].equals(c[sid]) for sid in a)


def test_outcome_types():
    pois = pd.concat(simulate("pois", 1).values())
    assert (pois["y"] >= 0).all() and pois["y"].dtype.kind == "i" and pois["y"].max() > 1
    gauss = pd.concat(simulate("gauss", 1).values())
    assert gauss["y"].dtype.kind == "f"


def test_truth_is_recoverable():
    """Gaussian: y - X beta - b_site is N(0, 1) noise; random effects have the set covariance."""
    s = SETTINGS["gauss"]
    frames, b = simulate("gauss", 3), random_effects("gauss", 3)
    resid = np.concatenate([df["y"] - df[list(COVARIATES)].to_numpy() @ np.array(BETA) - b.loc[sid, "intercept"]
                            for sid, df in frames.items()])
    assert abs(resid.mean()) < 0.06 and abs(resid.std() - 1) < 0.05
    # a random slope on X5 enters eta exactly as b0 + b1 * X5
    slope = dataclasses.replace(s, slope_sd=0.5, slope_corr=0.3, sigma=1e-9)
    frames, b = simulate(slope, 3), random_effects(slope, 3)
    for sid, df in frames.items():
        eta = df[list(COVARIATES)].to_numpy() @ np.array(BETA) + b.loc[sid, "intercept"] + b.loc[sid, "X5"] * df["X5"]
        np.testing.assert_allclose(df["y"], eta, atol=1e-6)
    # random effects drawn with the set covariance
    big = Setting(sites=4000, patients=1, intercept_var=1.0, slope_sd=0.5, slope_corr=0.3)
    r = random_effects(big, 0).to_numpy()
    np.testing.assert_allclose(np.cov(r.T), big.covariance, atol=0.06)
    assert np.corrcoef(r.T)[0, 1] == pytest.approx(0.3, abs=0.05)


def test_binomial_marginal_rate_and_site_spread():
    """Prevalence near the Monte-Carlo truth; larger intercept variance spreads site rates more."""
    rates1 = [df["y"].mean() for df in simulate(dataclasses.replace(SETTINGS["many"], intercept_var=1.0), 0).values()]
    rates4 = [df["y"].mean() for df in simulate(dataclasses.replace(SETTINGS["many"], intercept_var=4.0), 0).values()]
    assert np.std(rates4) > np.std(rates1)
    # overall rate against a direct Monte-Carlo of the model (marginal over X and b)
    rng = np.random.default_rng(9)
    n = 200_000
    X = np.column_stack([rng.binomial(1, 0.5, (n, 4)), rng.uniform(-1, 1.5, (n, 6))])
    p = 1 / (1 + np.exp(-(X @ np.array(BETA) + rng.normal(0, 1, n))))
    assert np.mean(rates1) == pytest.approx(p.mean(), abs=0.05)


def test_train_validation_split():
    frames = simulate("s3", 2)
    train, valid = train_validation(frames, seed=4)
    assert list(train) == list(valid) == list(frames)
    for sid, df in frames.items():
        assert len(valid[sid]) == 150 and len(train[sid]) == 350
        assert set(train[sid].index).isdisjoint(valid[sid].index)
        pd.testing.assert_frame_equal(pd.concat([train[sid], valid[sid]]).sort_index(), df)
    t2, v2 = train_validation(frames, seed=4)
    assert all(v2[s].index.equals(valid[s].index) for s in frames)
    _, v3 = train_validation(frames, seed=5)
    assert not all(v3[s].index.equals(valid[s].index) for s in frames)
    t, v = train_validation(simulate("s5", 1), fraction=0.3, seed=0)
    assert all(len(v[s]) == 9 and len(t[s]) == 21 for s in t)
