"""Many small sites: a site whose few groups all go as summaries does not fit its own rows for the hybrid's
start when there are more than ``MANY_SITES`` sites (its fit adds little to the pseudo-data and costs most
of the one-shot round); the fit is the same."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm import protocol
from fedglmm.errors import FedGLMMError
from fedglmm.model.options import MANY_SITES, SKIP_OWN_GROUPS
from fedglmm.site.site import Site


def _sites(k: int, groups_per_site: int = 4, seed: int = 5, family: str = "binomial") -> dict:
    rng = np.random.default_rng(seed)
    G = k * groups_per_site
    g = np.repeat(np.arange(G), 30)
    x = rng.normal(size=(g.size, 3))
    if family == "binomial":
        eta = -0.3 + 0.6 * x[:, 0] + rng.normal(0, 0.8, G)[g]
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    else:
        y = rng.poisson(np.exp(0.3 + x @ np.array([0.5, -0.3, 0.2]) + rng.normal(0, 1.0, G)[g]))
    df = pd.DataFrame({"y": y, "x": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "g": g})
    return {f"s{j}": df[df.g // groups_per_site == j].reset_index(drop=True) for j in range(k)}


def _own_fits_sent(monkeypatch, data, formula: str = "y ~ x + (1 | g)", family: str = "binomial") -> tuple[int, object]:
    sent = []
    handle = Site.handle

    def spy(self, raw):
        out = handle(self, raw)
        rep = protocol.decode(out)
        if isinstance(rep, dict) and rep.get("kind") == "oneshot":
            sent.append(rep.get("local") is not None)
        return out

    monkeypatch.setattr(Site, "handle", spy)
    res = fedglmm.fit(formula, data, family=family)
    monkeypatch.setattr(Site, "handle", handle)
    return sum(sent), res


def test_many_small_sites_send_no_own_fit_and_fit_the_same(monkeypatch):
    warnings.simplefilter("ignore")
    assert 4 < SKIP_OWN_GROUPS
    data = _sites(MANY_SITES + 5)
    n_own, res = _own_fits_sent(monkeypatch, data)
    assert n_own == 0
    it = fedglmm.fit("y ~ x + (1 | g)", data, family="binomial", method="iterative")
    assert res.converged and res.rounds <= 4
    assert np.allclose(res.fixef, it.fixef, atol=1e-8) and np.allclose(res.theta, it.theta, atol=1e-8)
    few = _sites(3, groups_per_site=4 * (MANY_SITES + 5) // 3)
    n_own, _ = _own_fits_sent(monkeypatch, few)
    assert n_own == 3


def test_many_small_sites_of_counts_send_their_own_fits(monkeypatch):
    """Counts keep the sites' fits however many sites: the order-2 pseudo-data of a count beside real
    covariates give slopes standard errors off, which the fits correct (benchmarks/many_sites_counts.py:
    without them 34 of 40 such fits took more than 4 rounds, with them none)."""
    warnings.simplefilter("ignore")
    data = _sites(MANY_SITES + 10, groups_per_site=8, family="poisson")
    formula = "y ~ x + x2 + x3 + (1 | g)"
    n_own, res = _own_fits_sent(monkeypatch, data, formula, "poisson")
    assert n_own == len(data)
    it = fedglmm.fit(formula, data, family="poisson", method="iterative")
    assert res.converged and res.rounds <= 4
    assert np.allclose(res.fixef, it.fixef, atol=1e-8) and np.allclose(res.theta, it.theta, atol=1e-8)
    assert abs(res.loglik - it.loglik) < 1e-8


def test_a_bad_number_of_sites_is_refused():
    site = next(iter(fedglmm.api.make_sites(_sites(2)).values()))
    req = protocol.request("oneshot", formula="y ~ x + (1 | g)", family="binomial", link="logit", order=2,
                           local={"nagq": 1, "curvature": "observed", "sites": "many"})
    rep = protocol.decode(site.handle(protocol.encode(req) if hasattr(protocol, "encode") else req))
    assert "sites" in str(rep.get("error", ""))
