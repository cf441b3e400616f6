"""Sites of 100-499 groups send their fit's third derivatives along θ; the hybrid then starts from the fits
combined to third order and steps with their sum as the model, without pseudo-data at the coordinator."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fedglmm
import fedglmm.likelihood.newton_end as newton_end
import fedglmm.methods.hybrid as hybrid
from fedglmm.coordinator.starts import OwnPart, cubic_surrogate
from fedglmm.likelihood.linalg import symmetric_third


def _parts(rng, n=4, k=3):
    out = []
    for _ in range(k):
        A = rng.standard_normal((n, n))
        K = A @ A.T + n * np.eye(n)
        c = rng.standard_normal(n)
        out.append(OwnPart(K, K @ c, c, 100.0, symmetric_third(rng.standard_normal((n, n, n)))))
    return out


def test_cubic_surrogate_has_the_derivatives_it_claims():
    """Its gradient and Hessian are the derivatives of its value (central differences), and its Hessian
    changes by the sites' third derivatives summed along any move (a cubic: exactly)."""
    rng = np.random.default_rng(3)
    parts = _parts(rng)
    S = cubic_surrogate(parts)
    x, d = rng.standard_normal(4), rng.standard_normal(4)
    f, g, H = S(x)
    h = 1e-5
    fd_g = np.array([(S(x + h * e)[0] - S(x - h * e)[0]) / (2 * h) for e in np.eye(4)])
    fd_H = np.array([(S(x + h * e)[1] - S(x - h * e)[1]) / (2 * h) for e in np.eye(4)])
    assert np.allclose(g, fd_g, rtol=1e-7, atol=1e-6)
    assert np.allclose(H, fd_H, rtol=1e-7, atol=1e-6)
    T = sum(o.T for o in parts)
    assert np.allclose(S(x + d)[2] - H, T @ d, rtol=1e-10, atol=1e-10)
    # and at a site's own estimate its part contributes that fit's information and no gradient
    one = cubic_surrogate(parts[:1])
    _, g0, H0 = one(parts[0].center)
    assert np.allclose(g0, 0.0, atol=1e-12) and np.allclose(H0, parts[0].K)


def _sites(seed: int, G: int = 300, m: int = 30) -> dict:
    """Counts, ``y ~ x + (1 | g)``, G groups of m rows dealt to 3 sites (100 groups each)."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), m)
    x = rng.normal(size=g.size)
    y = rng.poisson(np.exp(-0.5 + 0.5 * x + rng.normal(0, 0.8, G)[g]))
    df = pd.DataFrame({"y": y, "x": x, "g": g})
    return {f"s{k}": d.reset_index(drop=True) for k, d in df.groupby(g % 3)}


def _fit_seen(sites, monkeypatch):
    seen, parts = [], []
    real = hybrid._fits_suffice

    def spy(own, *a):
        parts.append(own)
        seen.append(real(own, *a))
        return seen[-1]

    monkeypatch.setattr(hybrid, "_fits_suffice", spy)
    return fedglmm.fit("y ~ x + (1 | g)", sites, family="poisson"), seen, parts


def test_sites_of_a_hundred_groups_send_third_derivatives_along_theta(monkeypatch):
    _, seen, parts = _fit_seen(_sites(0), monkeypatch)
    assert seen == ["third"]
    for o in parts[0].values():
        assert o.T is not None
        assert np.allclose(o.T[:2, :2, :2], 0.0)            # none among the fixed effects alone
        assert np.abs(o.T[2, 2, 2]) > 0                     # the SD's own


@pytest.mark.parametrize("seed", [4, 5])
def test_the_fits_third_derivatives_start_and_step_to_the_pooled_fit(monkeypatch, seed):
    """The start from the fits combined to third order and steps with their sum as the model: 3 rounds,
    the pooled fit's numbers (conditional SDs moved to the estimate too); with plain Newton steps from the same
    start (and the last step to third order ending a fit from 5e-7 alone) these data take 4 rounds."""
    sites = _sites(seed)
    res, seen, _ = _fit_seen(sites, monkeypatch)
    assert seen == ["third"] and res.rounds == 3
    pooled = fedglmm.fit("y ~ x + (1 | g)", pd.concat(sites.values(), ignore_index=True), family="poisson")
    assert abs(res.loglik - pooled.loglik) < 1e-8 * abs(pooled.loglik)
    assert np.allclose(res.fixef, pooled.fixef, rtol=0, atol=1e-7 * float(np.min(pooled.se)))
    assert np.allclose(res.theta, pooled.theta, rtol=1e-7)
    assert np.allclose(res.condsd, pooled.condsd.loc[res.condsd.index], rtol=1e-8)
    monkeypatch.setattr(hybrid, "cubic_surrogate", lambda parts: None)
    monkeypatch.setattr(newton_end, "THIRD_LAST", 5e-7)     # (from up to 1e-5 the last step to third order ends it)
    assert fedglmm.fit("y ~ x + (1 | g)", sites, family="poisson").rounds == 4
