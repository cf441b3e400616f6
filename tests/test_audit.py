"""The site's audit log: one line per request, hashes of the exact bytes that left, append-only, no data."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedglmm
from fedglmm import cli, protocol
from fedglmm.site.audit import AuditLog, describe_fields, read_log
from fedglmm.errors import InputError, SiteRefusal
from fedglmm.methods.iterative import fit_iterative
from fedglmm.model.options import fit_request
from fedglmm.site import Site
from fedglmm.site.rules import SiteConfig
from fedglmm.transport import InProcessTransport
from recording import Recorder

FORMULA = "y ~ x + f + (1 | g)"
ENTRY_KEYS = {"time", "site", "kind", "request_bytes", "request_sha256", "reply_bytes", "reply_sha256"}

try:
    runner = CliRunner(mix_stderr=False)
except TypeError:
    runner = CliRunner()


def simulate(ngroups: int, size: int, prefix: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat([f"{prefix}{i}" for i in range(ngroups)], size)
    n = len(g)
    x = rng.normal(size=n)
    f = np.array(["a", "b", "c"])[np.arange(n) % 3]
    eta = 0.3 + 0.8 * x + np.repeat(rng.normal(0, 0.7, ngroups), size)
    return pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "f": f, "g": g})


@pytest.fixture(scope="module")
def frames() -> dict:
    return {"A": simulate(10, 14, "a", 1), "B": simulate(8, 12, "b", 2)}


def audited_fit(frames, tmp_path, config=None, method="iterative"):
    recs = {sid: Recorder(Site(sid, fr, config=config, audit=tmp_path / f"{sid}.jsonl"))
            for sid, fr in frames.items()}
    transport = InProcessTransport(recs)
    req = fit_request(FORMULA, "binomial", method=method)
    if method == "iterative":
        res = fit_iterative(transport, req)
    else:
        from fedglmm.methods.hybrid import fit_hybrid

        res = fit_hybrid(transport, req)
    return res, recs, transport


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("method", ["iterative", "hybrid"])
def test_one_line_per_request_with_hashes_of_the_bytes_sent(frames, tmp_path, method):
    res, recs, transport = audited_fit(frames, tmp_path, method=method)
    for sid, rec in recs.items():
        entries = read_log(tmp_path / f"{sid}.jsonl")
        assert len(entries) == len(rec.calls) == transport.rounds
        assert [e["kind"] for e in entries] == [protocol.decode(req)["kind"] for req, _ in rec.calls]
        for e, (req, out) in zip(entries, rec.calls):
            assert set(e) == ENTRY_KEYS | {"sent"}
            assert e["site"] == sid
            assert e["request_bytes"] == len(req) and e["request_sha256"] == sha(req)
            assert e["reply_bytes"] == len(out) and e["reply_sha256"] == sha(out)
            assert e["time"].endswith("Z") and e["time"][10] == "T"
            # the fields listed are the fields of the reply that left
            assert e["sent"] == describe_fields(protocol.decode(out))
            assert all(set(f) == {"name", "shape", "dtype"} for f in e["sent"])


def test_fields_sent_name_shape_dtype(frames, tmp_path):
    _, recs, _ = audited_fit(frames, tmp_path)
    entries = read_log(tmp_path / "A.jsonl")
    setup = next(e for e in entries if e["kind"] == "setup")
    fields = {f["name"]: f for f in setup["sent"]}
    assert fields["xtx"] == {"name": "xtx", "shape": [4, 4], "dtype": "float64"}
    assert fields["n"] == {"name": "n", "shape": [], "dtype": "int"}
    ev = next(e for e in entries if e["kind"] == "evaluate")
    assert {"name": "points[0].hess", "shape": [5, 5], "dtype": "float64"} in ev["sent"]
    fin = entries[-1]
    assert fin["kind"] == "finalize"
    assert {"name": "modes", "shape": [10, 1], "dtype": "float64"} in fin["sent"]


def test_no_row_level_value_in_the_log(frames, tmp_path):
    """Only names, shapes, dtypes, sizes and hashes: no number of the data or of a reply appears."""
    res, recs, _ = audited_fit(frames, tmp_path)
    # every field but the time stamp (whose seconds, e.g. 30.008, can hold a short value such as 0.0)
    text = "\n".join(json.dumps({k: v for k, v in e.items() if k != "time"}) for e in read_log(tmp_path / "A.jsonl"))
    for e in read_log(tmp_path / "A.jsonl"):
        for f in e.get("sent", []):
            assert isinstance(f["name"], str) and isinstance(f["dtype"], str)
            assert all(isinstance(k, int) for k in f["shape"])
    values = np.r_[frames["A"]["x"].to_numpy()[:20], res.ranef()["Intercept"].to_numpy()[:5], res.fixef.to_numpy()]
    for v in values:
        assert repr(float(v))[:8] not in text


def test_log_is_append_only_across_fits(frames, tmp_path):
    audited_fit(frames, tmp_path)
    first = (tmp_path / "A.jsonl").read_bytes()
    n1 = len(first.splitlines())
    audited_fit(frames, tmp_path)
    second = (tmp_path / "A.jsonl").read_bytes()
    assert second.startswith(first)
    assert len(second.splitlines()) == 2 * n1
    assert all(json.loads(line) for line in second.splitlines())


def test_refusal_is_logged_with_its_reason(frames, tmp_path):
    small = {"A": frames["A"], "B": frames["B"].iloc[:8]}
    with pytest.raises(SiteRefusal):
        audited_fit(small, tmp_path, config=SiteConfig())
    (e,) = read_log(tmp_path / "B.jsonl")
    assert e["kind"] == "describe" and "sent" not in e
    assert e["refused"] == "site 'B' refuses: 8 rows, fewer than the minimum of 10 (min_rows in the site's rules)"
    assert set(e) == ENTRY_KEYS | {"refused"}
    a = read_log(tmp_path / "A.jsonl")
    assert len(a) == 1 and "sent" in a[0]


def test_malformed_request_is_logged(tmp_path, frames):
    site = Site("A", frames["A"], audit=tmp_path / "a.jsonl")
    out = site.handle(b"not a message")
    (e,) = read_log(tmp_path / "a.jsonl")
    assert e["kind"] is None and "malformed" in e["refused"]
    assert e["reply_sha256"] == sha(out) and e["request_sha256"] == sha(b"not a message")


def test_audit_log_from_site_toml(tmp_path, frames):
    (tmp_path / "conf").mkdir()
    toml = tmp_path / "conf" / "site.toml"
    toml.write_text('[audit]\nlog = "audit.jsonl"\n')
    res = fedglmm.fit(FORMULA, frames, family="binomial", site_config=toml)
    entries = read_log(tmp_path / "conf" / "audit.jsonl")       # relative to site.toml's folder
    assert len(entries) == 2 * res.rounds
    assert {e["site"] for e in entries} == {"A", "B"}


def test_unwritable_audit_log_is_refused_at_start(tmp_path, frames):
    with pytest.raises(InputError, match="cannot open audit log"):
        Site("A", frames["A"], audit=tmp_path / "no" / "such" / "folder" / "a.jsonl")


def test_failed_log_write_sends_nothing(tmp_path, frames):
    class Broken(AuditLog):
        def append(self, entry):
            raise OSError("disk full")

    site = Site("A", frames["A"], audit=Broken(tmp_path / "a.jsonl"))
    out = protocol.decode(site.handle(protocol.encode(protocol.request("describe", formula=FORMULA))))
    assert set(out) == {"error"} and "cannot write its audit log" in out["error"]


# --- fedglmm site log ---------------------------------------------------------------------------

def test_cli_site_log_table(frames, tmp_path):
    small = {"A": frames["A"], "B": frames["B"].iloc[:8]}
    audited_fit(frames, tmp_path)
    with pytest.raises(SiteRefusal):
        audited_fit(small, tmp_path, config=SiteConfig())
    r = runner.invoke(cli.app, ["site", "log", str(tmp_path / "B.jsonl")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.stderr
    n = len(read_log(tmp_path / "B.jsonl"))
    assert f"{n} requests" in r.stdout
    for kind in ("describe", "setup", "evaluate", "finalize"):
        assert kind in r.stdout
    assert "xtx[4×4]" in r.stdout and "points[" in r.stdout
    assert "REFUSED" in r.stdout and "8 rows, fewer than the minimum of 10" in r.stdout


def test_cli_site_log_json(frames, tmp_path):
    audited_fit(frames, tmp_path)
    r = runner.invoke(cli.app, ["site", "log", "--json", str(tmp_path / "A.jsonl")])
    assert r.exit_code == 0
    assert [json.loads(line) for line in r.stdout.splitlines()] == read_log(tmp_path / "A.jsonl")


def test_cli_site_log_errors_are_one_line(tmp_path):
    r = runner.invoke(cli.app, ["site", "log", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [f"error: cannot read audit log '{tmp_path / 'missing.jsonl'}': "
                                     "No such file or directory"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "describe"}\nnot json\n')
    r = runner.invoke(cli.app, ["site", "log", str(bad)])
    assert r.exit_code == 1
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: audit log") and "line 2 is not valid JSON" in line


def test_cli_site_group_help():
    r = runner.invoke(cli.app, ["site", "--help"])
    assert r.exit_code == 0 and "log" in r.stdout


def test_cli_site_without_command_shows_help():
    r = runner.invoke(cli.app, ["site"])
    assert r.exit_code == 0 and "log" in r.stdout and r.stderr == ""
