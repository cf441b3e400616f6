"""A site that bounds what it answers: hostile request sequences driven straight at a :class:`Site`, each
refused with one line naming the rule that stops it (and logged), while every legitimate fit -- iterative,
hybrid, AGHQ, a batch of profile points -- stays within the default limits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm import protocol
from fedglmm.site import Site, SiteConfig
from fedglmm.site.audit import read_log
from fedglmm.transport import InProcessTransport
from recording import Recorder

FORMULA = "y ~ x + (1 | g)"


def frame(n_groups=20, size=15, seed=3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{seed}_{i}" for i in range(n_groups)], size)
    x = rng.normal(size=len(g))
    eta = -0.3 + 0.8 * x + np.repeat(rng.normal(0, 0.7, n_groups), size)
    return pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "g": g})


@pytest.fixture(scope="module")
def requests() -> dict:
    """The requests of a real iterative fit (one site), by kind: replayed, then twisted."""
    rec = Recorder(Site("A", frame(), config=SiteConfig()))
    fedglmm.fit_on(InProcessTransport({"A": rec}), FORMULA, family="binomial", method="iterative")
    out = {}
    for data, _ in rec.calls:
        req = protocol.decode(data)
        out.setdefault(req["kind"], req)
    return out


def ask(site: Site, req: dict, session=None) -> dict:
    return protocol.decode(site.handle(protocol.encode(req), session=session))


def set_up(site: Site, requests: dict, session=None) -> None:
    for kind in ("describe", "setup"):
        assert "error" not in ask(site, requests[kind], session)


def refused(reply: dict, rule: str) -> str:
    assert set(reply) == {"error"}, reply
    msg = reply["error"]
    assert "\n" not in msg and msg.startswith("site 'A' refuses: "), msg
    assert msg.endswith(f"({rule})"), msg
    return msg


def test_evaluate_before_any_set_up_is_refused(requests):
    site = Site("A", frame(), config=SiteConfig())
    for kind in ("evaluate", "finalize"):
        refused(ask(site, requests[kind]), "rule: same session")


def test_evaluate_from_another_session_is_refused(requests):
    site = Site("A", frame(), config=SiteConfig())
    set_up(site, requests, session="run 1")
    assert "error" not in ask(site, requests["evaluate"], session="run 1")
    refused(ask(site, requests["evaluate"], session="run 2"), "rule: same session")


def test_ten_thousand_points_in_one_request(requests):
    site = Site("A", frame(), config=SiteConfig())
    set_up(site, requests)
    point = np.asarray(requests["evaluate"]["points"])[0]
    msg = refused(ask(site, dict(requests["evaluate"], points=np.tile(point, (10_000, 1)))),
                  "max_points in the site's rules")
    assert "10000 points" in msg


def test_a_transform_with_a_huge_entry(requests):
    site = Site("A", frame(), config=SiteConfig())
    set_up(site, requests)
    A = np.array(requests["evaluate"]["transform"], float)
    A[1, 1] = 1e12
    refused(ask(site, dict(requests["evaluate"], transform=A)), "max_scaled in the site's rules")
    B = np.array(requests["evaluate"]["transform"], float)
    B[1, 0] = 0.5                             # mixes the intercept into the slope: not a centring
    refused(ask(site, dict(requests["evaluate"], transform=B)), "rule: transform")
    refused(ask(site, dict(requests["evaluate"], zscale=-np.asarray(requests["evaluate"]["zscale"]))),
            "rule: transform")


def test_the_transform_is_fixed_at_set_up(requests):
    site = Site("A", frame(), config=SiteConfig())
    set_up(site, requests)
    assert "error" not in ask(site, requests["evaluate"])
    A = np.array(requests["evaluate"]["transform"], float)
    A[1, 1] *= 1.01
    refused(ask(site, dict(requests["evaluate"], transform=A)), "rule: transform")


@pytest.mark.parametrize("value", [1e7, np.nan, np.inf])
def test_parameters_outside_their_bounds(requests, value):
    site = Site("A", frame(), config=SiteConfig())
    set_up(site, requests)
    points = np.array(requests["evaluate"]["points"], float)
    points[0, 0] = value
    refused(ask(site, dict(requests["evaluate"], points=points)), "max_param in the site's rules")


def test_a_thousand_requests_in_one_fit(requests):
    site = Site("A", frame(), config=SiteConfig())
    set_up(site, requests)
    replies = [ask(site, requests["evaluate"]) for _ in range(1000)]
    ok = [r for r in replies if "error" not in r]
    assert len(ok) == SiteConfig().max_requests - 1          # the set-up was the fit's first request
    msg = refused(replies[len(ok)], "max_requests in the site's rules")
    assert "200" in msg
    assert all("error" in r for r in replies[len(ok):])


def test_two_fits_one_row_apart(requests, tmp_path):
    """Rows differing by one (a missing value, another column, an edited file): refused; the same rows
    again, or rows differing by at least min_rows, are fine.  The state file carries it across restarts."""
    cfg = SiteConfig(state_file=str(tmp_path / "state.json"))
    full = frame()
    set_up(Site("A", full, config=cfg), requests)
    set_up(Site("A", full, config=cfg), requests)                       # the same rows: fine
    one_less = full.drop(index=7).reset_index(drop=True)
    site = Site("A", one_less, config=cfg)
    assert "error" not in ask(site, requests["describe"])
    msg = refused(ask(site, requests["setup"]), "min_rows in the site's rules")
    assert "by 1 row," in msg
    refused(ask(Site("A", one_less, config=cfg), requests["setup"]), "min_rows in the site's rules")
    state = (tmp_path / "state.json").read_text()
    assert str(round(full["x"].iloc[0], 6))[:6] not in state and "g3_0" not in state    # hashes, no value
    eleven_less = full.drop(index=range(11)).reset_index(drop=True)
    set_up(Site("A", eleven_less, config=cfg), requests)


def test_fits_per_day(requests, tmp_path):
    cfg = SiteConfig(max_fits_per_day=3, state_file=str(tmp_path / "state.json"))
    for _ in range(3):
        set_up(Site("A", frame(), config=cfg), requests)
    site = Site("A", frame(), config=cfg)
    msg = refused(ask(site, requests["setup"]), "max_fits_per_day in the site's rules")
    assert "3 fits" in msg


def test_refusals_are_logged_naming_the_rule(requests, tmp_path):
    site = Site("A", frame(), config=SiteConfig(audit_log=str(tmp_path / "audit.jsonl")))
    ask(site, requests["evaluate"])
    set_up(site, requests)
    A = np.array(requests["evaluate"]["transform"], float)
    A[1, 1] = 1e12
    ask(site, dict(requests["evaluate"], transform=A))
    entries = read_log(tmp_path / "audit.jsonl")
    assert [e["kind"] for e in entries] == ["evaluate", "describe", "setup", "evaluate"]
    assert "rule: same session" in entries[0]["refused"] and "max_scaled" in entries[3]["refused"]
    assert (tmp_path / "audit.jsonl.state.json").exists()          # the limits' memory sits by the log


def test_legitimate_fits_stay_within_the_default_limits(requests):
    """Iterative, hybrid, AGHQ and a profile-sized batch of points pass the default limits unchanged."""
    frames = {"A": frame(seed=1), "B": frame(seed=2), "C": frame(seed=4)}
    for method, nagq in (("iterative", 1), ("hybrid", 1), ("hybrid", 9)):
        plain = fedglmm.fit(FORMULA, frames, family="binomial", method=method, nagq=nagq)
        ruled = fedglmm.fit(FORMULA, frames, family="binomial", method=method, nagq=nagq,
                            site_config=SiteConfig(min_group=1))
        np.testing.assert_allclose(ruled.fixef, plain.fixef, rtol=0, atol=1e-12)
    site = Site("A", frame(), config=SiteConfig())
    set_up(site, requests)
    point = np.asarray(requests["evaluate"]["points"])[0]
    batch = point + np.random.default_rng(0).normal(0, 0.1, (SiteConfig().max_points, len(point)))
    reply = ask(site, dict(requests["evaluate"], points=batch))
    assert "error" not in reply and len(reply["points"]) == SiteConfig().max_points


def test_limits_in_site_toml(tmp_path):
    toml = tmp_path / "site.toml"
    toml.write_text("[limits]\nmax_points = 50\nmax_requests = inf\nmax_param = 100.0\n"
                    "require_secure_aggregation = true\n[audit]\nstate = 'mem.json'\n")
    cfg = SiteConfig.load(toml)
    assert cfg.max_points == 50 and cfg.max_requests == float("inf") and cfg.max_param == 100.0
    assert cfg.require_secure_aggregation is True and cfg.state_path == str(tmp_path / "mem.json")
    toml.write_text("[limits]\nmax_points = 0\n")
    with pytest.raises(fedglmm.errors.InputError, match="max_points"):
        SiteConfig.load(toml)


def test_a_setup_riding_again_continues_or_opens_a_fit(requests):
    """Two hybrid-like fits in one session with the same set-up riding on their first evaluation (the
    design is kept): each is set up; a post-fit request riding it stays in the fit; from another session
    the same payload starts a fit of its own."""
    site = Site("A", frame(), config=SiteConfig())
    setup, evaluate = requests["setup"], requests["evaluate"]
    ride = {k: v for k, v in setup.items()}
    oneshot = {"kind": "oneshot", "formula": setup["formula"], "family": setup["family"], "link": setup.get("link"),
               "order": 2}
    for _ in range(2):
        assert "error" not in ask(site, oneshot, "run 1")
        assert "error" not in ask(site, dict(evaluate, setup=ride), "run 1")
        assert "error" not in ask(site, dict(evaluate, setup=ride), "run 1")
    assert "error" not in ask(site, dict(evaluate, setup=ride), "run 2")
    assert site.limits.state.fits_today() == 3
