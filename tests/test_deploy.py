"""Deployment pieces that need no running federation: the loopback guard, option checks, certificates,
the Flower transport on a stand-in grid, and fedglmm without Flower."""
from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedglmm.cli import app
from fedglmm.deploy.superlink import LoopbackGuard, is_loopback


def run_cli(*args):
    from typer.main import get_command

    import io
    import contextlib

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = get_command(app).main(list(map(str, args)), prog_name="fedglmm", standalone_mode=False)
    return code, out.getvalue(), err.getvalue()


# --- the guard in front of the SuperLink ----------------------------------------------------------

def _call(guard, host, path):
    sent, called = [], []

    async def inner(scope, receive, send):
        called.append(scope["path"])

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request"}

    g = LoopbackGuard(inner) if guard else inner
    asyncio.run(g({"type": "http", "path": path, "client": (host, 5555)}, receive, send))
    status = sent[0]["status"] if sent else None
    return bool(called), status


@pytest.mark.parametrize("host,path,served", [
    ("10.1.2.3", "/v1/fleet/pull-messages", True),
    ("10.1.2.3", "/v1/control/start-run", False),
    ("10.1.2.3", "/v1/runtime/acquire-task", False),
    ("10.1.2.3", "/v1/fleetx/anything", False),
    ("192.168.0.5", "/docs", False),
    ("127.0.0.1", "/v1/control/start-run", True),
    ("::1", "/v1/runtime/push-messages", True),
    ("127.8.9.10", "/v1/runtime/pull-messages", True),
])
def test_only_the_fleet_api_is_served_to_other_machines(host, path, served):
    called, status = _call(True, host, path)
    assert called is served
    assert status == (None if served else 403)


def test_lifespan_passes_through_the_guard():
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(LoopbackGuard(inner)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


@pytest.mark.parametrize("host,expected", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("[::1]", True), ("0.0.0.0", False), ("10.0.0.1", False),
                                           ("example.org", False), (None, False)])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


# --- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["coordinator", "start", "--address", "0.0.0.0:9092", "--insecure"],
     "--insecure is only allowed on loopback addresses, not --address '0.0.0.0:9092'"),
    (["coordinator", "start", "--address", "127.0.0.1:9092"], "give --certificates DIR"),
    (["coordinator", "start", "--address", "nonsense"], "--address 'nonsense' is not HOST:PORT"),
    (["site", "start", "--data", "{data}", "--site-id", "A", "--superlink", "10.0.0.1:9092", "--insecure"],
     "--insecure is only allowed on loopback addresses, not --superlink '10.0.0.1:9092'"),
    (["site", "start", "--data", "missing.csv", "--site-id", "A", "--superlink", "h:1"],
     "--data 'missing.csv' is not a file"),
    (["fit", "-f", "y ~ x + (1 | g)", "--federation", "coord.example.org:9092", "--insecure"],
     "--insecure is only allowed on loopback addresses, not --federation 'coord.example.org:9092'"),
])
def test_bad_deployment_options_are_one_line_errors(tmp_path, args, message):
    data = tmp_path / "a.csv"
    data.write_text("y,x,g\n1,2,a\n")
    code, out, err = run_cli(*[a.replace("{data}", str(data)) for a in args])
    assert code == 1, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert out == ""


def test_coordinator_needs_site_keys_unless_told_not_to(tmp_path):
    from fedglmm.deploy.certs import write_certs

    write_certs(tmp_path)
    code, _, err = run_cli("coordinator", "start", "--address", "127.0.0.1:9092", "--certificates", tmp_path)
    assert code == 1 and "give --auth-keys FILE" in err


def test_federation_takes_no_data_files(tmp_path):
    data = tmp_path / "a.csv"
    data.write_text("y,x,g\n1,2,a\n")
    code, _, err = run_cli("fit", "-f", "y ~ x + (1 | g)", "--federation", "127.0.0.1:9092", data)
    assert code == 2 and "--federation fits over the connected sites" in err
    code, _, err = run_cli("fit", "-f", "y ~ x + (1 | g)", "--sites", "3", data)
    assert code == 2 and "go with --federation" in err


# --- certificates -----------------------------------------------------------------------------------

def test_certs_are_valid_for_the_hosts_and_keys_private(tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    code, _, err = run_cli("certs", tmp_path, "--host", "coord.example.org", "--host", "10.1.2.3",
                           "--site", "A", "--site", "B")
    assert code == 0, err
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"ca.key", "ca.pem", "server.key", "server.pem", "A.key", "A.pub", "B.key", "B.pub",
                     "authorized_keys.csv"}
    for secret in ("ca.key", "server.key", "A.key", "B.key"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "coord.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3", "::1"} <= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    from fedglmm.deploy.certs import read_public_keys

    assert [n for n, _ in read_public_keys(tmp_path / "authorized_keys.csv")] == ["A", "B"]


def test_bad_auth_keys_file(tmp_path):
    from fedglmm.deploy.certs import read_public_keys
    from fedglmm.errors import InputError

    bad = tmp_path / "keys.csv"
    bad.write_text("ssh-rsa notakey\n")
    with pytest.raises(InputError, match="line 1: not an OpenSSH public key"):
        read_public_keys(bad)
    with pytest.raises(InputError, match="a site name is given twice"):
        from fedglmm.deploy.certs import write_certs

        write_certs(tmp_path / "c", sites=["A", "A"])


# --- the transport on a stand-in grid ---------------------------------------------------------------

class FakeGrid:
    """Answers like a SuperLink whose nodes are in-process sites; ``silent``/``broken`` misbehave."""

    def __init__(self, sites: dict, silent=(), broken=(), instances=False):
        self.sites = {1000 + i: s for i, s in enumerate(sites.values())}
        self.silent, self.broken = set(silent), set(broken)
        self.queue = {}
        self.instances = {nid: "1" for nid in self.sites} if instances else {}

    def restart(self, site):
        """The site's process starts again: same node, same rows, nothing of the fit; its own instance."""
        nid = next(n for n, s in self.sites.items() if s.site_id == site.site_id)
        self.sites[nid] = site
        self.instances[nid] = str(int(self.instances[nid]) + 1)

    def get_node_ids(self):
        return list(self.sites)

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            mid = f"m{len(self.queue)}"
            self.queue[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        from flwr.app import ConfigRecord, Error, Message, RecordDict

        out = []
        for mid in ids:
            m = self.queue[mid]
            site = self.sites[m.metadata.dst_node_id]
            if site.site_id in self.silent:
                continue
            if site.site_id in self.broken:
                rep = Message(Error(code=0, reason="node went away"), reply_to=m)
            else:
                req = bytes(m.content["fedglmm"]["request"])
                body = site.handle(req) if req else b""
                rec = {"reply": body, "site": site.site_id}
                if self.instances:
                    rec["instance"] = self.instances[m.metadata.dst_node_id]
                rep = Message(RecordDict({"fedglmm": ConfigRecord(rec)}), reply_to=m)
            rep.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(rep)
        return out


@pytest.fixture
def flower_identity():
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 2, 3
    yield


def _sites():
    import pandas as pd

    from fedglmm.api import make_sites
    from fedglmm.cli import DEMO_FILE
    from importlib import resources

    with resources.as_file(resources.files("fedglmm") / "data" / DEMO_FILE) as path:
        data = pd.read_csv(path)
    return make_sites(data, "region")


def test_flower_transport_equals_in_process_on_a_stand_in_grid(flower_identity):
    import fedglmm
    from fedglmm.transport import InProcessTransport
    from fedglmm.transport.flower import FlowerTransport

    formula = "use ~ urban + age + (1 | district)"
    t = FlowerTransport(FakeGrid(_sites()), expected=4, timeout=2, connect_timeout=2, poll=0.001)
    res = fedglmm.fit_on(t, formula, family="binomial")          # a federation of 4: secure aggregation
    assert res.secure_aggregation
    ref_t = InProcessTransport(_sites())
    ref = fedglmm.fit_on(ref_t, formula, family="binomial", secure_aggregation=True)
    assert t.site_ids == sorted(ref_t.site_ids)
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-10, rel=0)
    assert (t.rounds, t.bytes_to_sites, t.bytes_from_sites) == (ref_t.rounds, ref_t.bytes_to_sites,
                                                                 ref_t.bytes_from_sites)


@pytest.mark.parametrize("fault,message", [
    (dict(silent={"south"}), "site 'south' did not answer round 1 (oneshot) within 0.3 s"),
    (dict(broken={"east"}), "site 'east' failed round 1 (oneshot): node went away"),
])
def test_a_silent_or_failing_site_ends_the_fit_naming_it_and_the_round(flower_identity, fault, message):
    import fedglmm
    from fedglmm.transport.flower import FederationError, FlowerTransport

    grid = FakeGrid(_sites())
    t = FlowerTransport(grid, expected=4, timeout=0.3, connect_timeout=1, poll=0.001)
    t.connect()
    grid.silent, grid.broken = fault.get("silent", set()), fault.get("broken", set())
    with pytest.raises(FederationError) as err:
        fedglmm.fit_on(t, "use ~ urban + (1 | district)", family="binomial")
    assert str(err.value) == message


@pytest.mark.parametrize("secure", [False, True])
def test_a_restarted_site_is_let_back_in_and_the_round_retried(flower_identity, secure):
    """A site whose process restarts between two rounds (its next request finds a site with no fit) or
    during one: it is asked again, with the set-up riding along (and, with secure aggregation, after a new
    key exchange, every site asked again with fresh masks); the fit is the same to 1e-8."""
    import fedglmm
    from fedglmm.transport import InProcessTransport
    from fedglmm.transport.flower import FlowerTransport

    formula = "use ~ urban + age + (urban | district)"
    ref = fedglmm.fit_on(InProcessTransport(_sites()), formula, family="binomial", secure_aggregation=secure)
    for at in (2, 3):
        grid = FakeGrid(_sites(), instances=True)
        fresh = _sites()

        def on_round(number, kind, at=at):
            if number == at:
                grid.restart(fresh["south"])

        t = FlowerTransport(grid, expected=4, timeout=5, connect_timeout=2, poll=0.001, probe_every=0.01,
                            on_round=on_round)
        res = fedglmm.fit_on(t, formula, family="binomial", secure_aggregation=secure)
        np.testing.assert_allclose(res.fixef, ref.fixef, rtol=0, atol=1e-8)
        np.testing.assert_allclose(res.theta, ref.theta, rtol=0, atol=1e-8)
        assert res.loglik == pytest.approx(ref.loglik, abs=1e-8)
        assert res.rounds == ref.rounds + (2 if secure else 0)      # the key exchange and the round again


def test_too_few_or_twice_named_sites(flower_identity):
    from fedglmm.transport.flower import FederationError, FlowerTransport

    grid = FakeGrid(_sites(), silent={"west"})
    with pytest.raises(FederationError, match=r"^3 sites answered at the federation, expected 4; waited 0.3 s$"):
        FlowerTransport(grid, expected=4, connect_timeout=0.3, poll=0.001).connect()
    t = FlowerTransport(grid, expected=None, connect_timeout=0.3, poll=0.001)
    t.connect()                      # no number given: whoever answers
    assert t.site_ids == ["east", "north", "south"]
    grid = FakeGrid(_sites())
    grid.sites[1000].site_id = grid.sites[1001].site_id
    with pytest.raises(FederationError, match="two connected sites call themselves"):
        FlowerTransport(grid, expected=4, connect_timeout=0.3, poll=0.001).connect()


# --- fedglmm without Flower -------------------------------------------------------------------------

def test_fedglmm_runs_without_flower(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["flwr"] = None          # any 'import flwr' now fails
        import fedglmm, fedglmm.cli, fedglmm.transport.flower, fedglmm.deploy.cli
        from fedglmm.cli import main
        sys.argv = ["fedglmm", "fit", "-f", "use ~ urban + (1 | district)", "--family", "binomial",
                    "--federation", "127.0.0.1:9092", "--insecure"]
        main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: --federation needs Flower: pip install 'fedglmm[flower]'"


def test_a_node_gone_before_the_fit_is_left_out(flower_identity):
    """A node the SuperLink still lists but that answers with Flower's 'node unavailable' error."""
    from fedglmm.transport.flower import FederationError, FlowerTransport

    grid = FakeGrid(_sites(), broken={"west"})
    t = FlowerTransport(grid, expected=3, connect_timeout=1, poll=0.001)
    t.connect()
    assert t.site_ids == ["east", "north", "south"]
    with pytest.raises(FederationError, match="^3 sites answered at the federation, expected 4"):
        FlowerTransport(grid, expected=4, connect_timeout=0.3, poll=0.001).connect()


def test_a_reply_from_another_sites_process_ends_the_fit(flower_identity):
    """A node whose reply names another site (that site's process attached to this node's SuperNode, e.g.
    two sites on one machine given the same --port): the fit stops naming both, no mixed-up rows."""
    import fedglmm
    from fedglmm.transport.flower import FederationError, FlowerTransport

    grid = FakeGrid(_sites())
    t = FlowerTransport(grid, expected=4, timeout=1, connect_timeout=1, poll=0.001)
    t.connect()
    south = next(n for n, s in grid.sites.items() if s.site_id == "south")
    grid.sites[south] = _sites()["north"]          # north's process now answers south's node
    with pytest.raises(FederationError, match=r"^site 'south''s node answered round 1 \(oneshot\) as site "
                                              r"'north': another site's process is attached"):
        fedglmm.fit_on(t, "use ~ urban + (1 | district)", family="binomial")


def test_a_site_refuses_a_port_in_use(tmp_path):
    """The site's task loop talks to whatever listens on its --port: a port already taken (another site's
    SuperNode) is refused before anything starts."""
    import socket

    data = tmp_path / "a.csv"
    data.write_text("y,x,g\n1,2,a\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = run_cli("site", "start", "--data", data, "--site-id", "A", "--superlink",
                                 "127.0.0.1:9", "--insecure", "--port", port)
    assert code == 1, err
    assert err.splitlines()[-1] == f"error: --port {port}: 127.0.0.1:{port} is in use (another site or program); " \
                                   "give this site a port of its own"
