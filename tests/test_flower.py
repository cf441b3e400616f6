"""Deployment on Flower, end to end on 127.0.0.1 with TLS and SuperNode keys.

One SuperLink (``fedglmm coordinator start``) and three sites (``fedglmm site start``) run as separate
process groups, killed at teardown.  The contraception data are split by region: north, east and south
are the three sites; west joins once, under a rule that refuses its data.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

flwr = pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedglmm[flower]')")

import fedglmm  # noqa: E402
from fedglmm.errors import FedGLMMError  # noqa: E402

DATA = Path(fedglmm.__file__).parent / "data" / "contraception.csv"
FORMULA = "use ~ urban + age + (urban | district)"
SITES = ["north", "east", "south"]
TIMEOUT = 8.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "fedglmm.cli", *map(str, args)]


class Procs:
    """Processes started in their own process groups; all of each group is killed at the end."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.procs = folder, env, {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig=signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        try:                            # whatever of the group is left
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("federation")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(folder / "flwr"))
    data = pd.read_csv(DATA)
    frames = {}
    for region, frame in data.groupby("region"):
        frames[region] = frame.drop(columns="region").reset_index(drop=True)
        frames[region].to_csv(folder / f"{region}.csv", index=False)
    certs = folder / "certs"
    r = subprocess.run(_cli("certs", certs, *[a for s in SITES + ["west"] for a in ("--site", s)]),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    port = _free_port()
    procs = Procs(folder, env)
    try:
        procs.start("coordinator", _cli("coordinator", "start", "--address", f"127.0.0.1:{port}",
                                         "--certificates", certs, "--auth-keys", certs / "authorized_keys.csv"))
        deadline = time.monotonic() + 60
        while "authorised 4 site keys" not in procs.log("coordinator"):   # up, and the keys registered
            assert procs.procs["coordinator"].poll() is None, procs.log("coordinator")
            assert time.monotonic() < deadline, procs.log("coordinator")
            time.sleep(0.2)
        for s in SITES:
            procs.start(s, _cli("site", "start", "--data", folder / f"{s}.csv", "--site-id", s,
                                "--superlink", f"localhost:{port}", "--root-certificates", certs / "ca.pem",
                                "--auth-key", certs / f"{s}.key", "--port", _free_port(),
                                "--audit", folder / f"{s}.audit.jsonl"))
        yield dict(folder=folder, certs=certs, port=port, frames=frames, procs=procs, env=env)
    finally:
        procs.close()


def _federated(fed, sites=3, timeout=TIMEOUT, on_round=None):
    from fedglmm.transport.flower_run import federation

    return federation(f"127.0.0.1:{fed['port']}", root_certificates=fed["certs"] / "ca.pem", sites=sites,
                      timeout=timeout, connect_timeout=60.0, on_round=on_round)


def test_fit_over_flower_equals_in_process(fed):
    """The CLI's fit over the federation equals the in-process fit of the same three frames."""
    out = fed["folder"] / "fit.json"
    r = subprocess.run(_cli("fit", "--formula", FORMULA, "--family", "binomial",
                            "--federation", f"127.0.0.1:{fed['port']}", "--root-certificates",
                            fed["certs"] / "ca.pem", "--sites", 3, "--timeout", 60, "--json", out, "--quiet"),
                       capture_output=True, text=True, env=fed["env"], timeout=150)
    assert r.returncode == 0, r.stderr + fed["procs"].log("coordinator")
    assert "Random effects" in r.stdout and "Secure aggregation: on" in r.stdout
    got = json.loads(out.read_text())
    assert got["secure_aggregation"] is True                 # three sites over a network: on by default
    ref = fedglmm.fit(FORMULA, {s: fed["frames"][s] for s in SITES}, family="binomial", secure_aggregation=True)
    assert sorted(got["sites"]) == sorted(SITES)
    assert got["nobs"] == ref.nobs
    for k, v in ref.fixef.items():
        assert got["fixef"][k] == pytest.approx(v, abs=1e-8, rel=0)
    assert got["loglik"] == pytest.approx(ref.loglik, abs=1e-8, rel=0)
    assert got["rounds"] == ref.rounds
    assert got["bytes_to_sites"] == ref.bytes_to_sites

    # the Python side: theta too, and the same result object as in-process; with secure aggregation (the
    # default here) and without, over the same federation: the same estimates to 1e-10.  A recorder between the
    # coordinator and the network sees no site's sums but masked.
    recorder = {}
    with _federated(fed) as transport:
        res = fedglmm.fit_on(_Recording(transport, recorder), FORMULA, family="binomial")
        plain = fedglmm.fit_on(transport, FORMULA, family="binomial", secure_aggregation=False)
    assert res.secure_aggregation and not plain.secure_aggregation
    np.testing.assert_allclose(res.theta, ref.theta, rtol=0, atol=1e-8)
    np.testing.assert_allclose(res.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=0, atol=1e-8)
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-8, rel=0)
    assert res.rounds == ref.rounds and res.bytes_from_sites > 0
    for a, b in ((res.fixef, plain.fixef), (res.theta, plain.theta)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)
    # (the standard errors to 1e-7: without secure aggregation the sites' third derivatives at a round's point
    # move the information to the estimate, masked sums do not carry them -- 1.2e-8 apart here)
    np.testing.assert_allclose(res.se.to_numpy(), plain.se.to_numpy(), rtol=1e-7, atol=0)
    assert res.loglik == pytest.approx(plain.loglik, rel=1e-10, abs=1e-10)
    masked = [rep for kind, replies in recorder["rounds"] if kind in ("setup", "evaluate", "finalize")
              for rep in replies.values()]
    assert len(masked) == 3 * (res.rounds - 1)
    sums = {"value", "grad", "hess", "colsum", "colsq", "xtx", "ztz", "st_xvx", "st_xv", "st_xy", "st_sy"}
    assert all(not sums & set(_all_keys(rep)) and rep["secagg"]["masked"].dtype == np.uint64 for rep in masked)

    # each site's audit log lists every request of the three fits, in order, with what it sent
    from fedglmm import protocol
    from fedglmm.api import make_sites
    from fedglmm.site.audit import read_log
    from fedglmm.transport import InProcessTransport
    from recording import Recorder

    kinds = {}
    for secure in (True, False):
        recs = {sid: Recorder(site) for sid, site in make_sites({s: fed["frames"][s] for s in SITES}).items()}
        fedglmm.fit_on(InProcessTransport(recs), FORMULA, family="binomial", secure_aggregation=secure)
        kinds[secure] = [protocol.decode(req)["kind"] for req, _ in recs[SITES[0]].calls]
    for s in SITES:
        entries = read_log(fed["folder"] / f"{s}.audit.jsonl")
        assert [e["kind"] for e in entries] == kinds[True] * 2 + kinds[False], (s, [e["kind"] for e in entries])
        for e in entries:
            assert e["site"] == s and "refused" not in e
            assert e["sent"] and e["reply_bytes"] > 0 and len(e["reply_sha256"]) == 64


def test_a_dispersion_family_over_flower_equals_in_process(fed):
    """Gamma (log link; its shape a parameter of the same Newton rounds) with secure aggregation over the
    federation: the in-process fit of the same frames to 1e-8, the dispersion included."""
    formula = "age + 14 ~ urban + (1 | district)"            # age is centred: + 14 makes it positive
    with _federated(fed) as transport:
        res = fedglmm.fit_on(transport, formula, family="gamma", link="log")
    ref = fedglmm.fit(formula, {s: fed["frames"][s] for s in SITES}, family="gamma", link="log",
                      secure_aggregation=True)
    assert res.secure_aggregation and res.converged and res.rounds == ref.rounds
    np.testing.assert_allclose(res.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=0, atol=1e-8)
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-8, rel=0)
    assert res.dispersion["sigma"] == pytest.approx(ref.dispersion["sigma"], abs=1e-8, rel=0)


class _Recording:
    """A transport that keeps every round's replies as the coordinator receives them."""

    def __init__(self, inner, store: dict):
        self.inner, self.store = inner, store
        store["rounds"] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def broadcast(self, message):
        replies = self.inner.broadcast(message)
        self.store["rounds"].append((message.get("kind"), replies))
        return replies


def _all_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _all_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_keys(v)


def test_fewer_sites_than_expected(fed):
    t0 = time.monotonic()
    r = subprocess.run(_cli("fit", "--formula", FORMULA, "--family", "binomial",
                            "--federation", f"127.0.0.1:{fed['port']}", "--root-certificates",
                            fed["certs"] / "ca.pem", "--sites", 5, "--timeout", 3),
                       capture_output=True, text=True, env=fed["env"], timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 3 sites answered at the federation, expected 5")
    assert r.stdout == ""
    # --timeout 3 honoured, not the default 60 s: the bound leaves room for a loaded machine's start-up (a
    # CLI process importing Flower took 30.6 s under load average 12 and failed a 30 s bound)
    assert time.monotonic() - t0 < 50


def test_a_site_rule_refuses_and_stops_the_fit(fed):
    folder, procs = fed["folder"], fed["procs"]
    toml = folder / "west.toml"
    toml.write_text("[disclosure]\nmin_rows = 100000\n")
    procs.start("west", _cli("site", "start", "--data", folder / "west.csv", "--site-id", "west",
                             "--config", toml, "--superlink", f"localhost:{fed['port']}",
                             "--root-certificates", fed["certs"] / "ca.pem", "--auth-key",
                             fed["certs"] / "west.key", "--port", _free_port()))
    try:
        with pytest.raises(FedGLMMError) as err:
            with _federated(fed, sites=4, timeout=30) as transport:
                fedglmm.fit_on(transport, FORMULA, family="binomial")
        msg = str(err.value)
        assert "west" in msg and "min_rows" in msg and "\n" not in msg
    finally:
        procs.kill("west")


def test_unauthorised_site_is_not_served(fed, tmp_path):
    """A SuperNode whose key was not given to the coordinator never joins: still three sites."""
    from fedglmm.deploy.certs import write_certs

    write_certs(tmp_path / "other", sites=["intruder"])
    procs = fed["procs"]
    procs.start("intruder", _cli("site", "start", "--data", fed["folder"] / "west.csv", "--site-id", "intruder",
                                 "--superlink", f"localhost:{fed['port']}", "--root-certificates",
                                 fed["certs"] / "ca.pem", "--auth-key", tmp_path / "other" / "intruder.key",
                                 "--port", _free_port()))
    try:
        with pytest.raises(FedGLMMError, match=r"^3 sites answered at the federation, expected 4"):
            with _federated(fed, sites=4, timeout=4) as transport:
                transport.connect_timeout = 6.0
                transport.site_ids
    finally:
        procs.kill("intruder")


def _start_site(fed, name: str):
    return fed["procs"].start(name, _cli("site", "start", "--data", fed["folder"] / f"{name}.csv", "--site-id", name,
                                         "--superlink", f"localhost:{fed['port']}", "--root-certificates",
                                         fed["certs"] / "ca.pem", "--auth-key", fed["certs"] / f"{name}.key",
                                         "--port", _free_port(), "--audit", fed["folder"] / f"{name}.audit.jsonl"))


def test_a_site_killed_and_restarted_mid_fit_gives_the_same_fit(fed):
    """kill -9 of a site (its process and its SuperNode) after round 2, started again at once: it is let
    back in within the timeout, keys are exchanged again and the round is asked again (secure aggregation,
    the default here), and the fit equals the undisturbed one.  (Without secure aggregation the round is
    asked again of the restarted site alone: tests/test_deploy.py.)"""
    ref = fedglmm.fit(FORMULA, {s: fed["frames"][s] for s in SITES}, family="binomial", secure_aggregation=True)
    procs, restarted = fed["procs"], {}

    def on_round(number, kind):
        if number == 2 and not restarted:
            procs.kill("south", signal.SIGKILL)
            restarted["at"] = time.monotonic()
            _start_site(fed, "south")

    with _federated(fed, timeout=60, on_round=on_round) as transport:
        res = fedglmm.fit_on(transport, FORMULA, family="binomial")
    assert restarted and res.converged and res.secure_aggregation
    np.testing.assert_allclose(res.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(res.theta, ref.theta, rtol=0, atol=1e-8)
    np.testing.assert_allclose(res.se.to_numpy(), ref.se.to_numpy(), rtol=1e-6, atol=0)
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-8, rel=0)
    assert res.rounds == ref.rounds + 2          # the key exchange and the round asked again


def test_a_site_killed_mid_fit_gives_a_clear_error_in_time(fed):
    procs = fed["procs"]
    killed = {}

    def on_round(number, kind):
        if number == 3 and not killed:
            killed["at"] = time.monotonic()
            procs.kill("south", signal.SIGKILL)

    with pytest.raises(FedGLMMError) as err:
        with _federated(fed, on_round=on_round) as transport:
            fedglmm.fit_on(transport, FORMULA, family="binomial")
    waited = time.monotonic() - killed["at"]
    msg = str(err.value)
    assert msg.startswith("site 'south' ") and "round 4" in msg, msg
    assert "did not answer" in msg or "failed" in msg
    assert waited < TIMEOUT + 5


def _own_address() -> str | None:
    """This host's address on its default route, if it has one that is not loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.123", 9))          # no packet is sent
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_only_the_fleet_api_answers_other_machines(tmp_path):
    """Bound to all interfaces, the SuperLink takes runs from loopback only; sites' Fleet API is open."""
    import httpx

    ip = _own_address()
    if ip is None:
        pytest.skip("this host has no non-loopback address")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp_path / "flwr"))
    certs = tmp_path / "certs"
    subprocess.run(_cli("certs", certs, "--host", ip), check=True, capture_output=True, env=env)
    port = _free_port()
    procs = Procs(tmp_path, env)
    try:
        procs.start("coordinator", _cli("coordinator", "start", "--address", f"0.0.0.0:{port}",
                                         "--certificates", certs, "--no-node-auth"))
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.post(f"https://127.0.0.1:{port}/v1/fleet/get-run", verify=str(certs / "ca.pem"))
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, procs.log("coordinator")
                time.sleep(0.2)
        outside = {p: httpx.post(f"https://{ip}:{port}{p}", verify=str(certs / "ca.pem")).status_code
                   for p in ("/v1/control/start-run", "/v1/runtime/acquire-task", "/v1/fleet/get-run")}
        assert outside["/v1/control/start-run"] == 403 and outside["/v1/runtime/acquire-task"] == 403
        assert outside["/v1/fleet/get-run"] != 403
        from fedglmm.transport.flower_run import federation

        with pytest.raises(FedGLMMError, match="takes fits only from its own machine"):
            with federation(f"{ip}:{port}", root_certificates=certs / "ca.pem", sites=1, timeout=2):
                pass
    finally:
        procs.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_to_the_coordinator_stops_its_superlink(tmp_path):
    """`kill <pid>` of `fedglmm coordinator start` (not of its process group) leaves no SuperLink behind:
    the port is free and no process of the group is left."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_HOME=str(tmp_path / "flwr"))
    port = _free_port()
    proc = subprocess.Popen(_cli("coordinator", "start", "--address", f"127.0.0.1:{port}", "--insecure"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not _listening(port)
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)                  # nothing of the group is left
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
