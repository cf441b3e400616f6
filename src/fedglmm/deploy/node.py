"""A site's side of a deployment: its data and its answers in one process, Flower's SuperNode beside it.

:func:`run_site` keeps one :class:`~fedglmm.site.Site` alive and starts Flower's SuperNode
(``--isolation process``) as a child.  The SuperNode only connects out, to the coordinator's Fleet API,
and queues each message it receives as a ClientApp task on its own Runtime API, bound to 127.0.0.1.
Instead of letting Flower start a new ClientApp process per message (a second or more of start-up each
round, and the site's state lost between messages), this process acquires those tasks itself
(:class:`TaskServer`), answers each request with :meth:`Site.handle` and pushes the reply with the site
id next to it.  So a site runs only the fedglmm it installed: the app bundle that comes with a run is
never loaded, and the site's design and engine live as long as the site.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import FedGLMMError, InputError
from .superlink import is_loopback

RECORD = "fedglmm"          # the record holding our bytes, both ways


def flower_executable(name: str) -> str:
    """Flower's command ``name`` next to this Python, else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FedGLMMError(f"'{name}' not found: install Flower with pip install 'fedglmm[flower]'")
    return found


def split_address(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{what} '{address}' is not HOST:PORT")
    return host.strip("[]"), int(port)


def check_insecure(address: str, what: str) -> None:
    """``--insecure`` is for a single machine: refuse it for any address but loopback."""
    host, _ = split_address(address, what)
    if not is_loopback(host):
        raise InputError(f"--insecure is only allowed on loopback addresses, not {what} '{address}'; "
                         "use TLS (fedglmm certs)")


def flower_env() -> dict:
    """Flower's children (flower-superexec, flwr-clientapp) are found on PATH: put this Python's first."""
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")   # the SuperExec's wait between polls
    return env


def check_port_free(port: int) -> None:
    """The SuperNode's local port must be free: the site's task loop talks to whatever listens there, so a
    port held by another site's SuperNode would have this site answer that site's requests."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the SuperNode binds it
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise InputError(f"--port {port}: 127.0.0.1:{port} is in use (another site or program); give this "
                             "site a port of its own") from None


def supernode_command(superlink: str, site_id: str, *, root_certificates=None, insecure: bool = False,
                      auth_key=None, port: int = 9094) -> list[str]:
    cmd = [sys.executable, "-m", "fedglmm.deploy.supernode", "--superlink", superlink,
           "--node-config", f"site-id='{site_id}'", "--isolation", "process",
           "--host", "127.0.0.1", "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    elif root_certificates is not None:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def make_site(data: Path, site_id: str, config=None, audit=None, sep=None, encoding=None):
    """The site object for ``data`` (read with ``sep`` and ``encoding``, :func:`fedglmm.io.read_table`), under
    the rules of ``config`` (a site.toml; default: the strict defaults of :class:`~fedglmm.site.SiteConfig`),
    logging to ``audit`` (default: the config's)."""
    from ..io import read_table
    from ..site import Site, SiteConfig

    rules = SiteConfig.load(config) if config is not None else SiteConfig()
    frame = read_table(data, sep, encoding)
    return Site(site_id, frame, config=rules, audit=str(audit) if audit is not None else None)


class TaskServer:
    """Acquires the SuperNode's ClientApp tasks on its Runtime API and answers them with ``site``."""

    def __init__(self, site, runtime_address: str, poll: float = 0.05):
        self.site = site
        self.instance = secrets.token_hex(8)      # this process: a coordinator tells a restarted site by it
        self.address = runtime_address
        self.poll = poll
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="fedglmm-site", daemon=True)

    def start(self) -> "TaskServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _client(self, *interceptors):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors])

    def _loop(self) -> None:
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        from ..transport.flower import short_object_backoff

        short_object_backoff()
        acquire = self._client()
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        while not self.stopped.is_set():
            try:
                got = acquire.AcquireTask(request)
            except httpx.HTTPError:          # the SuperNode is starting or gone: try again
                self.stopped.wait(0.5)
                continue
            if got.HasField("task") and got.token:
                self._answer(got.token)
            else:
                self.stopped.wait(self.poll)

    def _answer(self, token: str) -> None:
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.common.constant import SubStatus
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        from .. import protocol

        client = self._client(RuntimeTokenHttpInterceptor(token))
        context, status, details = None, SubStatus.FAILED, "fedglmm could not answer"
        try:
            message, context, _run, _fab = pull_task_input(client)
            try:
                request = bytes(message.content[RECORD]["request"])
            except (KeyError, TypeError):
                request = None
            if request is None:
                reply = protocol.encode({"error": f"site '{self.site.site_id}': refused a message that is not "
                                                  "a fedglmm request"})
            elif not request:                           # the coordinator's identification round
                reply = b""
            else:                                       # the Flower run is the coordinator's session
                reply = self.site.handle(request, session=f"run {message.metadata.run_id}")
            out = Message(RecordDict({RECORD: ConfigRecord({"reply": reply, "site": self.site.site_id,
                                                            "instance": self.instance})}), reply_to=message)
            push_message(client, out, context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - the coordinator times out; the site keeps serving
            details = " ".join(str(exc).split()) or type(exc).__name__
        finally:
            try:
                push_task_output(client, context, status, details)
            finally:
                client.close()


def run_site(site, superlink: str, *, root_certificates=None, insecure: bool = False, auth_key=None,
             port: int = 9094, on_start=None, retry_for: float = 120.0, retry_wait: float = 5.0) -> int:
    """Serve ``site`` to the federation at ``superlink`` until the SuperNode exits; its exit code.

    A SuperNode that fails within 20 s of its start (the coordinator refused or could not be reached) is
    started again every ``retry_wait`` seconds for up to ``retry_for`` seconds.
    """
    if insecure:
        check_insecure(superlink, "--superlink")
    for path, what in ((root_certificates, "--root-certificates"), (auth_key, "--auth-key")):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{what} '{path}' is not a file")
    cmd = supernode_command(superlink, site.site_id, root_certificates=root_certificates, insecure=insecure,
                            auth_key=auth_key, port=port)
    check_port_free(port)
    tasks = TaskServer(site, f"127.0.0.1:{port}").start()
    state = {"proc": None, "stopping": False}

    def stop(signum, _frame):
        state["stopping"] = True
        if state["proc"] is not None and state["proc"].poll() is None:
            state["proc"].send_signal(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    first = time.monotonic()
    try:
        while True:
            started = time.monotonic()
            if state["proc"] is not None:
                check_port_free(port)            # a restart: the port may have been taken meanwhile
            proc = state["proc"] = subprocess.Popen(cmd, env=flower_env())
            if on_start is not None:
                on_start(proc)
            code = proc.wait()
            # A site restarted right after a crash is refused until the SuperLink gives up on its previous
            # connection (two missed heartbeats, about a minute): keep trying for a while.
            quick = time.monotonic() - started < 20
            if state["stopping"] or code == 0 or not quick or time.monotonic() - first > retry_for:
                return code
            print(f"site '{site.site_id}': the coordinator did not accept the connection (yet); trying again "
                  f"in {retry_wait:g} s", file=sys.stderr, flush=True)
            time.sleep(retry_wait)
            if state["stopping"]:
                return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        tasks.stop()
        proc = state["proc"]
        if proc is not None and proc.poll() is None:
            proc.kill()
