"""The sites' own fits' conditional modes as the start of shared levels' effects (several grouping factors):
what a site sends (its own fit's modes of its larger levels, on the user's scale; nothing under secure
aggregation), how the coordinator combines them (:func:`fedglmm.coordinator.own_combination.shared_level_modes`),
and a split fit that takes fewer rounds with them and ends at the same estimate."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.coordinator import own_combination
from fedglmm.methods import hybrid
from fedglmm.site.own_modes import big_levels
from fedglmm.site.secagg import SecureAggregation
from fedglmm.site.summaries import summarize, to_jsonable

FORMULA = "y ~ x + (1 | id) + (1 + x | item)"
LOCAL = {"nagq": 1, "curvature": "observed"}


def crossed(seed: int = 3, sites: int = 4, per: int = 30, items: int = 20):
    """Subjects (4-11 rows each) local to one of ``sites`` sites, items shared by all, poisson counts with a
    random intercept per subject and a random intercept and slope per item: (pooled frame, {site: frame})."""
    rng = np.random.default_rng(seed)
    S = sites * per
    sid = np.repeat(np.arange(S), rng.integers(4, 12, S))
    n = len(sid)
    item, x = rng.integers(0, items, n), rng.normal(size=n)
    eta = 0.3 + (0.5 + 0.4 * rng.normal(size=items)[item]) * x + rng.normal(0, 0.6, S)[sid] \
        + rng.normal(0, 0.8, items)[item]
    df = pd.DataFrame({"y": rng.poisson(np.exp(eta)), "x": x, "id": [f"p{k}" for k in sid],
                       "item": [f"i{k:02d}" for k in item]})
    return df, {f"s{k}": df[sid // per == k].reset_index(drop=True) for k in range(sites)}


@pytest.fixture(scope="module")
def data():
    return crossed()


def test_a_site_sends_its_larger_levels_modes_on_the_users_scale(data):
    """The one-shot message's own fit carries the modes and SDs of the levels with at least min_group rows
    (and of no other), equal to the site's own fit of its rows to 1e-4 -- intercept and slope, x in tens so
    that the slope's column is scaled inside (by its SD) -- though the own fit is cut short."""
    site = data[1]["s0"].assign(x=lambda d: 10.0 * d["x"])
    msg = summarize(site, FORMULA, "poisson", None, "s0", local=LOCAL, min_group=10)
    sent = msg["local"]["modes"]["item"]
    counts = site["item"].value_counts()
    assert sorted(sent["levels"]) == sorted(counts.index[counts >= 10])
    assert 0 < len(sent["levels"]) < len(counts)                        # (some levels withheld)
    assert sorted(msg["local"]["modes"]["id"]["levels"]) == sorted(site["id"].value_counts().loc[lambda c: c >= 10]
                                                                  .index)
    alone = fedglmm.fit(FORMULA, site, family="poisson")
    assert np.abs(sent["modes"] - alone.modes["item"].loc[sent["levels"]].to_numpy()).max() < 1e-4
    assert np.abs(sent["condsd"] - alone.condsd["item"].loc[sent["levels"]].to_numpy()).max() < 1e-4
    assert np.abs(sent["modes"][:, 1]).max() > 0.01                     # (the slopes' modes are not all 0)


def test_only_finite_modes_of_big_levels_go_and_the_steward_reads_what(data):
    """A level whose mode or SD is not finite is not sent (nor one below min_group); the readable message
    names how many levels of each factor have their modes in it."""
    sent = big_levels({"item": (["a", "b", "c"], np.array([12.0, 3.0, 15.0]), np.array([[0.1], [0.2], [np.nan]]),
                                 np.array([[0.3], [0.3], [0.3]]))}, 10)
    assert sent["item"]["levels"] == ["a"] and sent["item"]["modes"].shape == (1, 1)
    msg = summarize(data[1]["s0"], FORMULA, "poisson", None, "s0", local=LOCAL, min_group=10)
    about = to_jsonable(msg)["about"]["local"]
    assert f"{len(msg['local']['modes']['item']['levels'])} of 'item'" in about


def test_a_steward_keeps_the_modes_at_the_site(data, tmp_path):
    """``own_fit_modes = false`` in site.toml: the one-shot reply's own fit goes without modes (the rest of it
    as before); a value that is not true or false is a one-line error naming the key."""
    from fedglmm import protocol
    from fedglmm.errors import InputError
    from fedglmm.site import Site, SiteConfig

    request = protocol.request("oneshot", formula=FORMULA, family="poisson", order=2, local=LOCAL)
    replies = {}
    for keep in (True, False):
        (tmp_path / "site.toml").write_text(f"[disclosure]\nown_fit_modes = {str(keep).lower()}\n")
        site = Site("s0", data[1]["s0"], config=SiteConfig.load(tmp_path / "site.toml"))
        replies[keep] = protocol.decode(site.handle(protocol.encode(request)))["local"]
    assert "modes" in replies[True] and "modes" not in replies[False]
    assert np.array_equal(replies[True]["theta"], replies[False]["theta"])
    (tmp_path / "site.toml").write_text("[disclosure]\nown_fit_modes = 1\n")
    with pytest.raises(InputError, match="disclosure.own_fit_modes' must be true or false"):
        SiteConfig.load(tmp_path / "site.toml")


def test_secure_aggregation_keeps_the_modes_at_the_site():
    """Under secure aggregation a shared level's sums leave only masked, so the one-shot reply (the key
    exchange) goes without the own fit's modes; the rest of the own fit goes as before."""
    reply = {"kind": "oneshot", "sums": {"n": 3.0}, "local": {"beta": np.zeros(2), "modes": {"item": {}}}}
    out = SecureAggregation("s0").apply("oneshot", {"secagg": {"hello": True, "fit": "ab" * 8}}, reply, b"")
    assert "modes" not in out["local"] and "beta" in out["local"] and "sums" not in out
    assert "modes" in reply["local"]                                    # (the site's own copy untouched)


def test_combination_by_precision():
    """Two sites' modes of one level, b = 0.6 (SD 0.3, own prior SD 1) and b = 0.2 (SD 0.5, own prior SD 0.5:
    no information left), under a start's prior SD 0.8: the closed form Σ(b/c²) / (1/σ² + Σp) with
    p = max(1/c² − 1/σ_s², 0); a level no site sent keeps its prior."""
    st = SimpleNamespace(shared={"item": ["a", "b"]}, mask=np.ones((1, 1), bool), zs=np.ones(1), znames=["Intercept"],
                         factor_columns=lambda: {"item": np.array([0])})
    own = {"s1": {"z_names": ["Intercept"], "theta": np.array([1.0]),
                  "modes": {"item": {"levels": ["a"], "modes": np.array([[0.6]]), "condsd": np.array([[0.3]])}}},
           "s2": {"z_names": ["Intercept"], "theta": np.array([0.5]),
                  "modes": {"item": {"levels": ["a"], "modes": np.array([[0.2]]), "condsd": np.array([[0.5]])}}}}
    modes, sds = own_combination.shared_level_modes(st, own, (np.zeros(1), np.array([0.8])))
    total = 1 / 0.64 + (1 / 0.09 - 1.0)
    assert modes["item"].loc["a", "Intercept"] == pytest.approx((0.6 / 0.09 + 0.2 / 0.25) / total, rel=1e-12)
    assert sds["item"].loc["a", "Intercept"] == pytest.approx(total ** -0.5, rel=1e-12)
    assert modes["item"].loc["b", "Intercept"] == 0.0 and sds["item"].loc["b", "Intercept"] == pytest.approx(0.8)
    own["s1"]["z_names"] = own["s2"]["z_names"] = ["x"]                # not coded as agreed: not used
    assert own_combination.shared_level_modes(st, own, (np.zeros(1), np.array([0.8]))) is None


def test_a_split_fit_starts_nearer_and_ends_where_it_did(data, monkeypatch):
    """Split over 4 sites, the shared items' combined modes lie within 3 of the pooled fit's conditional SDs
    of its modes (which reach 17 of them from 0), and the hybrid takes fewer rounds (7 for 9) to the same
    estimate (1e-10) as without them and as the pooled fit."""
    pooled_rows, sites = data
    got = {}

    def keep(*args):
        got["modes"] = own_combination.shared_level_modes(*args)
        return got["modes"]

    monkeypatch.setattr(hybrid, "shared_level_modes", keep)
    fit = fedglmm.fit(FORMULA, sites, family="poisson")
    pooled = fedglmm.fit(FORMULA, pooled_rows, family="poisson")
    combined = got["modes"][0]["item"]
    sd = pooled.condsd["item"].loc[combined.index]
    assert ((combined - pooled.modes["item"].loc[combined.index]) / sd).abs().to_numpy().max() < 3.0
    assert (pooled.modes["item"] / pooled.condsd["item"]).abs().to_numpy().max() > 10.0
    monkeypatch.setattr(hybrid, "shared_level_modes", lambda *args: None)
    without = fedglmm.fit(FORMULA, sites, family="poisson")
    assert fit.rounds < without.rounds
    for other in (without, pooled):
        assert np.abs(fit.fixef - other.fixef).max() < 1e-10 and abs(fit.loglik - other.loglik) < 1e-9
        assert np.abs(np.asarray(fit.theta) - np.asarray(other.theta)).max() < 1e-9
