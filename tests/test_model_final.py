"""Where every group's moments went into the pseudo-data (binomial, poisson), the hybrid takes its surrogate's
step as the final candidate from a Newton decrement of 0.5 (not 0.05): many sites of a few count groups."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fedglmm
import fedglmm.likelihood.newton_end as newton_end
import fedglmm.methods.hybrid as hybrid


def _sites(seed: int, G: int = 100, m: int = 15, S: int = 25) -> dict:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), m)
    x = rng.normal(size=g.size)
    y = rng.poisson(np.exp(-0.5 + 0.5 * x + rng.normal(0, 0.8, G)[g]))
    df = pd.DataFrame({"y": y, "x": x, "g": g})
    return {f"s{k}": d.reset_index(drop=True) for k, d in df.groupby(g % S)}


@pytest.mark.parametrize("seed", [0, 3])
def test_the_surrogate_step_ends_the_fit_from_farther(monkeypatch, seed):
    sites = _sites(seed)
    res = fedglmm.fit("y ~ x + (1 | g)", sites, family="poisson")
    assert res.rounds == 3
    pooled = fedglmm.fit("y ~ x + (1 | g)", pd.concat(sites.values(), ignore_index=True), family="poisson")
    assert abs(res.loglik - pooled.loglik) < 1e-8 * abs(pooled.loglik)
    assert np.allclose(res.fixef, pooled.fixef, rtol=0, atol=1e-7 * float(np.min(pooled.se)))
    assert np.allclose(res.theta, pooled.theta, rtol=1e-7)
    # the same fit with the final candidate from 0.05, as the Newton rounds' default: a round more (with the last
    # step to third order ending a fit from a decrement of 5e-7, not 1e-5: from up to 1e-5 it gets there anyway)
    # (and without the start that takes each parameter from its source, coordinator.split_start: from it the fit
    # takes 3 rounds with either setting)
    monkeypatch.setattr(hybrid, "OWN_NEAR", 0.05)
    monkeypatch.setattr(newton_end, "THIRD_LAST", 5e-7)
    monkeypatch.setattr(hybrid, "one_shot_split", lambda *a: [])
    assert fedglmm.fit("y ~ x + (1 | g)", sites, family="poisson").rounds == 4
