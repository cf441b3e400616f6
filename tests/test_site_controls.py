"""Site disclosure rules: each rule refuses with one line naming the site and the rule, before anything
is sent; modes of small groups are withheld while the fit itself is unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedglmm
from fedglmm import cli, protocol
from fedglmm.errors import InputError, SiteRefusal
from fedglmm.methods.iterative import fit_iterative
from fedglmm.model.options import fit_request
from fedglmm.site import Site
from fedglmm.site.rules import SiteConfig
from fedglmm.transport import InProcessTransport
from recording import Recorder

DATA = Path(__file__).parent / "data"
FORMULA = "y ~ x + f + (1 | g)"

try:
    runner = CliRunner(mix_stderr=False)
except TypeError:
    runner = CliRunner()


def simulate(ngroups: int, size, prefix: str, seed: int, family: str = "binomial") -> pd.DataFrame:
    """Groups of ``size`` rows (an int or one size per group), a covariate x and a factor f in a/b/c."""
    rng = np.random.default_rng(seed)
    sizes = np.full(ngroups, size) if np.isscalar(size) else np.asarray(size)
    g = np.repeat([f"{prefix}{i}" for i in range(ngroups)], sizes)
    b = np.repeat(rng.normal(0, 0.8, ngroups), sizes)
    n = len(g)
    x = rng.normal(size=n)
    f = np.array(["a", "b", "c"])[np.arange(n) % 3]
    eta = -0.2 + 0.7 * x + np.where(f == "b", 0.4, 0.0) + b
    if family == "binomial":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    else:
        y = eta + rng.normal(0, 0.5, n)
    return pd.DataFrame({"y": y, "x": x, "f": f, "g": g, "extra": rng.normal(size=n)})


@pytest.fixture(scope="module")
def sites() -> dict:
    return {"A": simulate(12, 15, "a", 1), "B": simulate(10, 15, "b", 2)}


def recorded_fit(frames: dict, formula: str, family: str, config):
    recs = {sid: Recorder(Site(sid, fr, config=config)) for sid, fr in frames.items()}
    res = fit_iterative(InProcessTransport(recs), fit_request(formula, family, method="iterative"))
    return res, recs


def assert_refusal(excinfo, site: str, rule: str, source: str = "the site's rules"):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(f"site '{site}' refuses: "), msg
    assert msg.endswith(f"({rule} in {source})"), msg
    return msg


# --- defaults and compatibility -------------------------------------------------------------------

def test_defaults_are_the_strict_rules():
    c = SiteConfig()
    assert (c.min_rows, c.min_cell, c.max_params_per_row, c.min_group) == (10, 3, 0.33, 10)
    assert c.allowed_columns is None and c.audit_log is None and c.withhold_modes


def test_without_rules_nothing_is_withheld_or_refused():
    """In-process fits keep their behaviour: tiny sites and groups of 2 rows are fine, every mode is sent."""
    small = {"A": simulate(12, 15, "a", 1, "gaussian"), "B": simulate(2, 3, "b", 2, "gaussian")}
    res = fedglmm.fit(FORMULA, small)
    assert not res.ranef().isna().any().any() and res.withheld == []
    assert "withheld" not in res.to_dict()
    with pytest.raises(SiteRefusal):
        fedglmm.fit(FORMULA, small, site_config=SiteConfig())


# --- min_rows -----------------------------------------------------------------------------------

def test_site_with_8_rows_is_refused(sites):
    frames = {"A": sites["A"], "B": sites["B"].iloc[:8]}
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, frames, family="binomial", site_config=SiteConfig())
    msg = assert_refusal(e, "B", "min_rows")
    assert "8 rows, fewer than the minimum of 10" in msg
    # 10 rows pass this rule (the next one stops B: its factor levels)
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, {"A": sites["A"], "B": sites["B"].iloc[:10]}, family="binomial",
                    site_config=SiteConfig())
    assert "min_rows" not in str(e.value)


def test_refusal_sends_nothing_but_the_reason(sites):
    frames = {"A": sites["A"], "B": sites["B"].iloc[:8]}
    recs = {sid: Recorder(Site(sid, fr, config=SiteConfig())) for sid, fr in frames.items()}
    with pytest.raises(SiteRefusal):
        fit_iterative(InProcessTransport(recs), fit_request(FORMULA, "binomial", method="iterative"))
    (req, out), = recs["B"].calls            # the describe round only
    assert protocol.decode(req)["kind"] == "describe"
    assert set(protocol.decode(out)) == {"error"}


@pytest.mark.parametrize("method", ["hybrid", "oneshot"])
def test_rules_apply_to_one_shot_requests(sites, method):
    frames = {"A": sites["A"], "B": sites["B"].iloc[:8]}
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, frames, family="binomial", method=method, site_config=SiteConfig())
    assert_refusal(e, "B", "min_rows")


# --- allowed_columns ----------------------------------------------------------------------------

def test_column_outside_the_allowed_list_is_refused(sites):
    cfg = SiteConfig(allowed_columns=["y", "x", "g"])
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, sites, family="binomial", site_config=cfg)
    msg = assert_refusal(e, "A", "allowed_columns")
    assert "'f'" in msg and "'x'" not in msg


def test_allowed_columns_cover_outcome_group_and_offset(sites):
    frames = {k: v.assign(t=2.0) for k, v in sites.items()}
    for formula, missing in [("y ~ x + (1 | g)", "g"), ("y ~ x + offset(log(t)) + (1 | g)", "t")]:
        cols = [c for c in ("y", "x", "g", "t") if c != missing]
        with pytest.raises(SiteRefusal) as e:
            fedglmm.fit(formula, frames, family="binomial", site_config=SiteConfig(allowed_columns=cols))
        assert f"'{missing}'" in assert_refusal(e, "A", "allowed_columns")


def test_allowed_columns_hide_other_column_names(sites):
    cfg = SiteConfig(allowed_columns=["y", "x", "f", "g"])
    res, recs = recorded_fit(sites, FORMULA, "binomial", cfg)
    desc = protocol.decode(recs["A"].calls[0][1])
    assert set(desc["columns"]) == {"y", "x", "f", "g"}      # 'extra' is not named
    ref = fedglmm.fit(FORMULA, sites, family="binomial")
    assert np.allclose(res.fixef, ref.fixef, atol=1e-10)


# --- min_cell -----------------------------------------------------------------------------------

def test_small_factor_level_is_refused(sites):
    b = sites["B"].copy()
    b.loc[b.index[:-2], "f"] = np.where(b.index[:-2] % 2 == 0, "a", "b")
    b.loc[b.index[-2:], "f"] = "c"                            # level c: 2 rows at B
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, {"A": sites["A"], "B": b}, family="binomial", site_config=SiteConfig())
    msg = assert_refusal(e, "B", "min_cell")
    assert "column 'f' level 'c' has 2 rows, fewer than the minimum of 3" in msg
    b.loc[b.index[-3:], "f"] = "c"                            # 3 rows: allowed
    fedglmm.fit(FORMULA, {"A": sites["A"], "B": b}, family="binomial", site_config=SiteConfig())


def test_small_level_of_a_c_term_is_refused(sites):
    frames = {k: v.assign(k=np.arange(len(v)) % 4) for k, v in sites.items()}
    kb = np.arange(len(frames["B"])) % 4
    kb[kb == 3] = 0
    kb[-1] = 3                                                # level 3: one row at B
    frames["B"]["k"] = kb
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit("y ~ x + C(k) + (1 | g)", frames, family="binomial", site_config=SiteConfig())
    assert "column 'k' level '3' has 1 rows" in assert_refusal(e, "B", "min_cell")


def test_grouping_factor_is_not_a_cell(sites):
    """Groups of 2 rows do not trip min_cell: min_group governs groups."""
    frames = {"A": sites["A"], "B": simulate(15, 2, "b", 5)}
    res = fedglmm.fit("y ~ x + (1 | g)", frames, family="binomial",
                      site_config=SiteConfig(max_params_per_row=1.0))
    assert len(res.withheld) == 15


@pytest.mark.parametrize("klass", [1, 0])
def test_binomial_outcome_class_count(sites, klass):
    b = sites["B"].copy()
    b["y"] = 1 - klass
    b.loc[b.index[:2], "y"] = klass                          # 2 rows of one outcome class
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, {"A": sites["A"], "B": b}, family="binomial", site_config=SiteConfig())
    msg = assert_refusal(e, "B", "min_cell")
    assert f"outcome 'y' has 2 {'successes' if klass else 'failures'}, fewer than the minimum of 3" in msg
    # the same outcome as a gaussian response is not a class count
    fedglmm.fit("y ~ x + (1 | g)", {"A": sites["A"], "B": b}, site_config=SiteConfig())


def test_binomial_class_count_for_cbind_uses_totals(sites):
    a = sites["A"].assign(s=3, m=2)
    b = sites["B"].assign(s=3, m=0)
    b.loc[b.index[:2], "m"] = 1                               # 2 failures in all at B
    formula = "cbind(s, m) ~ x + (1 | g)"
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(formula, {"A": a, "B": b}, family="binomial", site_config=SiteConfig())
    assert "outcome 's' has 2 failures" in assert_refusal(e, "B", "min_cell")
    b.loc[b.index[:3], "m"] = 1
    rng = np.random.default_rng(0)
    for fr in (a, b):
        fr["s"] = rng.integers(1, 4, len(fr))
    fedglmm.fit(formula, {"A": a, "B": b}, family="binomial", site_config=SiteConfig())


def test_binomial_class_rule_in_one_shot(sites):
    b = sites["B"].assign(y=0)
    b.loc[b.index[:2], "y"] = 1
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, {"A": sites["A"], "B": b}, family="binomial", method="hybrid",
                    site_config=SiteConfig())
    assert "2 successes" in assert_refusal(e, "B", "min_cell")


# --- max_params_per_row -------------------------------------------------------------------------

def test_params_per_row():
    """y ~ x + f + (1 + x | g): 4 fixed-effect columns + 3 covariance parameters = 7 parameters."""
    formula = "y ~ x + f + (1 + x | g)"
    a = simulate(10, 15, "a", 1, "gaussian")
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(formula, {"A": a, "B": simulate(2, 10, "b", 2, "gaussian")}, site_config=SiteConfig())
    msg = assert_refusal(e, "B", "max_params_per_row")
    assert "7 parameters (4 fixed-effect columns, 3 covariance parameters) for 20 rows is 0.35 per row, " \
           "more than the maximum of 0.33" in msg
    # 22 rows: 7/22 = 0.318 is allowed
    fedglmm.fit(formula, {"A": a, "B": simulate(2, 11, "b", 2, "gaussian")}, site_config=SiteConfig())
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(formula, {"A": a, "B": simulate(2, 11, "b", 2, "gaussian")},
                    site_config=SiteConfig(max_params_per_row=0.3))
    assert_refusal(e, "B", "max_params_per_row")


# --- min_group: withheld modes ------------------------------------------------------------------

SIZES_A = [4, 30, 9, 25, 10, 40, 3, 22]
SIZES_B = [15, 6, 35, 12, 28, 2, 18]


@pytest.mark.parametrize("family", ["binomial", "gaussian"])
def test_small_groups_modes_withheld_estimates_unchanged(family):
    frames = {"A": simulate(len(SIZES_A), SIZES_A, "a", 3, family),
              "B": simulate(len(SIZES_B), SIZES_B, "b", 4, family)}
    full = fedglmm.fit(FORMULA, frames, family=family, method="iterative")   # the same rounds as recorded_fit
    res, recs = recorded_fit(frames, FORMULA, family, SiteConfig(min_group=10))
    small = {f"a{i}" for i, s in enumerate(SIZES_A) if s < 10} | {f"b{i}" for i, s in enumerate(SIZES_B) if s < 10}
    assert set(res.withheld) == small and len(small) == 5
    # the fit is the unrestricted one
    assert np.allclose(res.fixef, full.fixef, rtol=0, atol=1e-8)
    assert np.allclose(res.se, full.se, rtol=0, atol=1e-8)
    assert abs(res.loglik - full.loglik) <= 1e-8 * abs(full.loglik)
    assert np.allclose(res.cov_re, full.cov_re, rtol=0, atol=1e-8)
    # released modes are the unrestricted ones; withheld ones are NaN
    modes, sds = res.ranef(condvar=True)
    assert list(modes.index) == list(full.ranef().index)
    released = [lv for lv in modes.index if lv not in small]
    assert np.allclose(modes.loc[released], full.ranef().loc[released], rtol=0, atol=1e-7)
    assert modes.loc[sorted(small)].isna().all().all() and sds.loc[sorted(small)].isna().all().all()
    # nothing computed for a withheld group left its site
    for sid, rec in recs.items():
        req, out = rec.calls[-1]
        assert protocol.decode(req)["kind"] == "finalize"
        rep = protocol.decode(out)
        assert not set(rep["levels"]) & small and set(rep["withheld"]) <= small
        assert rep["modes"].shape == (len(rep["levels"]), 1) and rep["condsd"].shape == rep["modes"].shape
        assert np.isfinite(rep["modes"]).all()
    # predictions: population level for withheld groups, conditional for the others
    new = pd.DataFrame({"x": [0.5, 0.5], "f": ["b", "b"], "g": ["a0", "a1"]})     # a0 withheld, a1 not
    pred, pop = res.predict(new), res.predict(new, conditional=False)
    assert pred[0] == pytest.approx(pop[0], abs=1e-12)
    assert pred[1] == pytest.approx(pop[1] + modes.loc["a1", "Intercept"], abs=1e-12)
    # summary note, strict JSON with nulls
    assert "Note: conditional modes withheld by site rules for 5 groups" in res.summary()
    out = json.loads(res.to_json())
    assert out["ranef"]["g"]["a0"]["mode"]["Intercept"] is None
    assert out["ranef"]["g"]["a1"]["mode"]["Intercept"] is not None
    assert sorted(out["withheld"]["g"]) == sorted(small)


def test_cbind_groups_count_trials():
    """A group's size counts trials: 2 rows of 5 trials are 10 observations (sent), 1 row is 5 (withheld)."""
    rng = np.random.default_rng(7)
    frames = {}
    for sid, sizes in (("A", [1, 12, 20, 15]), ("B", [14, 2, 25, 11])):
        g = np.repeat([f"{sid}{i}" for i in range(len(sizes))], sizes)
        s = rng.integers(1, 5, len(g))
        frames[sid] = pd.DataFrame({"s": s, "m": 5 - s, "x": rng.normal(size=len(g)), "g": g})
    res = fedglmm.fit("cbind(s, m) ~ x + (1 | g)", frames, family="binomial", site_config=SiteConfig())
    assert res.withheld == ["A0"]


def test_min_group_also_governs_one_shot_blocks():
    frames = {"A": simulate(len(SIZES_A), SIZES_A, "a", 3, "gaussian"),
              "B": simulate(len(SIZES_B), SIZES_B, "b", 4, "gaussian")}
    cfg = SiteConfig(min_group=2)
    ok = fedglmm.fit(FORMULA, frames, method="oneshot", site_config=cfg)
    assert ok.withheld == []
    with pytest.raises(fedglmm.FedGLMMError, match="fewer than 10 observations"):
        fedglmm.fit(FORMULA, frames, method="oneshot", site_config=SiteConfig(min_rows=1))


# --- site.toml ----------------------------------------------------------------------------------

def test_load_site_toml(tmp_path):
    (tmp_path / "logs").mkdir()
    path = tmp_path / "site.toml"
    path.write_text('[disclosure]\nmin_rows = 20\nmin_cell = 5\nmax_params_per_row = 0.25\nmin_group = 12\n'
                    'allowed_columns = ["y", "x"]\n\n[audit]\nlog = "logs/audit.jsonl"\n')
    c = SiteConfig.load(path)
    assert (c.min_rows, c.min_cell, c.max_params_per_row, c.min_group) == (20, 5, 0.25, 12)
    assert c.allowed_columns == ["y", "x"]
    assert Path(c.audit_log) == (tmp_path / "logs" / "audit.jsonl").resolve()
    assert c.where("min_rows") == "min_rows in site.toml"
    path.write_text("[disclosure]\nmin_rows = 20\n")
    c = SiteConfig.load(path)
    assert c.min_rows == 20 and c.min_cell == 3 and c.audit_log is None


@pytest.mark.parametrize("text,fragment", [
    ("[disclosure]\nmin_rowz = 3\n", "unknown key 'disclosure.min_rowz'"),
    ("[disclosure]\nmin_rows = 'ten'\n", "'disclosure.min_rows' must be a whole number"),
    ("[disclosure]\nmin_rows = 2.5\n", "'disclosure.min_rows' must be a whole number"),
    ("[disclosure]\nmin_group = true\n", "'disclosure.min_group' must be a whole number ≥ 1"),
    ("[disclosure]\nmax_params_per_row = -1\n", "'disclosure.max_params_per_row' must be a number > 0"),
    ("[disclosure]\nallowed_columns = \"y\"\n", "'disclosure.allowed_columns' must be a list of column names"),
    ("[disclosure]\nallowed_columns = [1, 2]\n", "'disclosure.allowed_columns' must be a list"),
    ("[audit]\nlog = 3\n", "'audit.log' must be a file path"),
    ("[audit]\npath = 'a.jsonl'\n", "unknown key 'audit.path'"),
    ("[network]\nport = 1\n", "unknown key 'network'"),
    ("min_rows = 3\n", "unknown key 'min_rows'"),
    ("[disclosure\nmin_rows = 3\n", "is not valid TOML"),
])
def test_bad_site_toml_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        SiteConfig.load(path)
    msg = str(e.value)
    assert "\n" not in msg and fragment in msg and str(path) in msg, msg


def test_missing_site_toml(tmp_path):
    with pytest.raises(InputError, match="cannot read site config .*nope.toml"):
        SiteConfig.load(tmp_path / "nope.toml")


def test_bad_config_in_code():
    with pytest.raises(InputError, match="'min_cell' must be a whole number"):
        SiteConfig(min_cell=-1)
    with pytest.raises(InputError, match="site_config must be"):
        fedglmm.fit(FORMULA, simulate(5, 10, "a", 1), site_config=3)


def test_fit_takes_a_path(tmp_path, sites):
    path = tmp_path / "site.toml"
    path.write_text("[disclosure]\nmin_rows = 200\n")
    with pytest.raises(SiteRefusal) as e:
        fedglmm.fit(FORMULA, sites, family="binomial", site_config=str(path))
    assert "180 rows, fewer than the minimum of 200" in assert_refusal(e, "A", "min_rows", "site.toml")


# --- command line -------------------------------------------------------------------------------

def _files(tmp_path, frames):
    paths = []
    for sid, fr in frames.items():
        p = tmp_path / f"{sid}.csv"
        fr.to_csv(p, index=False)
        paths.append(p)
    return paths


def test_cli_refusal_is_one_line_exit_1(tmp_path, sites):
    cfg = tmp_path / "site.toml"
    cfg.write_text("[disclosure]\nmin_rows = 10\n")
    files = _files(tmp_path, {"A": sites["A"], "B": sites["B"].iloc[:8]})
    r = runner.invoke(cli.app, ["fit", "-f", FORMULA, "--family", "binomial", "--site-config", str(cfg),
                                *map(str, files)])
    assert r.exit_code == 1, r.stderr
    assert r.stdout == ""
    assert r.stderr.splitlines() == ["error: site 'B' refuses: 8 rows, fewer than the minimum of 10 "
                                     "(min_rows in site.toml)"]


def test_cli_bad_site_toml_is_one_line_exit_1(tmp_path, sites):
    cfg = tmp_path / "site.toml"
    cfg.write_text("[disclosure]\nmin_rows = 'x'\n")
    files = _files(tmp_path, sites)
    r = runner.invoke(cli.app, ["fit", "-f", FORMULA, "--family", "binomial", "--site-config", str(cfg),
                                *map(str, files)])
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: site config") and "disclosure.min_rows" in lines[0]


def test_cli_withheld_note(tmp_path):
    frames = {"A": simulate(len(SIZES_A), SIZES_A, "a", 3), "B": simulate(len(SIZES_B), SIZES_B, "b", 4)}
    cfg = tmp_path / "site.toml"
    cfg.write_text("[disclosure]\nmin_group = 10\n")
    files = _files(tmp_path, frames)
    r = runner.invoke(cli.app, ["fit", "-f", FORMULA, "--family", "binomial", "--site-config", str(cfg),
                                "--json", "-", *map(str, files)])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["withheld"]["g"]) == 5
    assert any("withheld by site rules for 5 groups" in m for m in out["messages"])


def test_cli_summarize_applies_the_site_rules(tmp_path, sites):
    (a_file,) = _files(tmp_path, {"A": sites["A"]})
    cfg = tmp_path / "site.toml"
    cfg.write_text('[disclosure]\nmin_rows = 500\n\n[audit]\nlog = "audit.jsonl"\n')
    out = tmp_path / "A.json"
    args = ["summarize", str(a_file), "-f", FORMULA, "--family", "binomial", "-o", str(out), "--moments", "2",
            "--site-config", str(cfg)]
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 1 and not out.exists()
    assert r.stderr.splitlines() == ["error: site 'A' refuses: 180 rows, fewer than the minimum of 500 "
                                     "(min_rows in site.toml)"]
    cfg.write_text('[disclosure]\nmin_group = 16\n\n[audit]\nlog = "audit.jsonl"\n')
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 0, r.stderr
    msg = json.loads(out.read_text())
    assert msg["groups"] is None and "fewer than 16 observations" in msg["refused"]
    from fedglmm.site.audit import read_log

    entries = read_log(tmp_path / "audit.jsonl")
    assert [e["kind"] for e in entries] == ["oneshot", "oneshot"]
    assert "refused" in entries[0] and "sent" in entries[1]
    # the file's content is the message logged: fitting from it gives the site's fit
    cfg.write_text("[disclosure]\nmin_group = 10\n")
    assert runner.invoke(cli.app, args).exit_code == 0
    direct = fedglmm.fit_summaries([out], FORMULA, family="binomial")
    assert direct.nobs == 180


def test_cli_site_config_not_with_summaries(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text("")
    r = runner.invoke(cli.app, ["fit", "-f", FORMULA, "--summaries", str(tmp_path / "a.json"),
                                "--site-config", str(cfg)])
    assert r.exit_code == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: --site-config applies to sites fitted from data files")
