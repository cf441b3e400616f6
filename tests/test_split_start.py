"""The hybrid's start by source (fedglmm.coordinator.split_start): the between-group entries from the one-shot
fit, the within-group slopes from the sites' own fits."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.coordinator import split_start
from fedglmm.coordinator.starts import OwnPart
from fedglmm.methods import hybrid
from fedglmm.model.options import NewtonConfig


def test_group_level_columns_are_those_constant_within_every_group():
    g = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    one = np.ones(8)
    z = np.array([0.5, 0.5, 0.5, -1.0, -1.0, 2.0, 2.0, 2.0])        # a group-level covariate
    x = np.arange(8.0)                                                # varies within groups
    w = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0])           # group-level here ...
    first = SimpleNamespace(X=np.c_[one, z, x, w], group=g)
    w2 = np.array([1.0, 1.0, 4.0, 2.0, 2.0])                          # ... but not in the other design
    second = SimpleNamespace(X=np.c_[np.ones(5), [1.0, 1.0, 1.0, 3.0, 3.0], np.arange(5.0), w2],
                             group=np.array([0, 0, 0, 1, 1]))
    assert split_start.group_level([first], 4).tolist() == [True, True, False, True]
    assert split_start.group_level([first, second], 4).tolist() == [True, True, False, False]
    assert split_start.group_level([first, None], 4) is None
    assert split_start.group_level([first], 3) is None           # columns that are not the model's


def test_split_start_is_the_fits_combination_with_the_between_entries_of_the_one_shot_fit():
    rng = np.random.default_rng(5)
    parts = []
    for _ in range(3):
        A = rng.normal(size=(5, 5))
        K = A @ A.T + np.eye(5)
        parts.append(OwnPart(K=K, h=K @ rng.normal(size=5), center=rng.normal(size=5), ngroups=3))
    x0 = rng.normal(size=5)
    got = split_start.split_start(parts, x0, np.array([0, 4]))
    xq = np.linalg.solve(sum(o.K for o in parts), sum(o.h for o in parts))
    assert np.allclose(got[[1, 2, 3]], xq[[1, 2, 3]], rtol=0, atol=1e-12)
    assert np.array_equal(got[[0, 4]], x0[[0, 4]])


def _sites_of_three_count_groups(seed: int, sd: float = 1.5, sites: int = 60) -> dict:
    """``sites`` sites of 3 poisson groups of ~100 rows each: two row-level covariates and a group-level one,
    a random intercept of SD ``sd`` (benchmarks/shape_sweep.py's draw 402 in kind)."""
    rng = np.random.default_rng([seed, 402])
    G = 3 * sites
    g = np.repeat(np.arange(G), np.maximum(5, rng.poisson(100, G)))
    n = g.size
    x, x2, z = rng.normal(size=n), rng.normal(size=n), rng.normal(size=G)[g]
    eta = 0.5 + 0.5 * x - 0.3 * x2 + 0.3 * z + rng.normal(0, sd, G)[g]
    df = pd.DataFrame({"y": rng.poisson(np.exp(eta)), "x": x, "x2": x2, "z": z, "g": g})
    return {f"s{i:02d}": df[g % sites == i].reset_index(drop=True) for i in range(sites)}


def test_many_sites_of_three_count_groups_of_a_large_sd_start_by_source(monkeypatch):
    """The sites' fits combined by their information put the intercept near σ² above its value (the sites
    with the larger effects have the larger information) and the group-level slope off; the one-shot fit puts
    the row-level slopes off.  The start taking each from its source ends in 4 rounds at the fit continued to
    machine precision, where without it the fit takes 6 (over seeds 0-7 and SDs 1.5 and 2.5, 57 rounds, at
    most 4, where without it 71, at most 6)."""
    warnings.simplefilter("ignore")
    data, formula = _sites_of_three_count_groups(5), "y ~ x + x2 + z + (1 | g)"
    opt = fedglmm.fit(formula, data, family="poisson", method="iterative", newton=NewtonConfig(tol=1e-16, near=1e-6))
    res = fedglmm.fit(formula, data, family="poisson")
    assert abs(res.loglik - opt.loglik) < 1e-8
    assert np.allclose(res.fixef, opt.fixef, rtol=0, atol=1e-6)
    assert np.allclose(res.theta, opt.theta, rtol=0, atol=1e-6)
    assert np.allclose(res.se, opt.se, rtol=1e-6, atol=0)
    assert res.rounds <= 4, res.rounds
    monkeypatch.setattr(hybrid, "one_shot_split", lambda *a: [])
    assert fedglmm.fit(formula, data, family="poisson").rounds > res.rounds
