"""Starting a fit on a Flower federation from the analyst's process: submit a small app bundle (FAB) with
the Control API, take over the run's ServerApp task on the Runtime API, and yield a
:class:`~fedglmm.transport.flower.FlowerTransport` on it (see :mod:`fedglmm.transport.flower` for the
design).  Flower is imported only inside the functions."""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import FedGLMMError
from .flower import APP_NAME, FederationError, FlowerTransport, _import_flower, _one_line, short_object_backoff

_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "fedglmm's federated GLMM fit: the sites answer with sums"
dependencies = []

[tool.flwr.app]
publisher = "fedglmm"

[tool.flwr.app.components]
serverapp = "fedglmm_site_app:server"
clientapp = "fedglmm_site_app:client"
"""

_GLUE = (b'"""Never loaded: the coordinator runs in the analyst\'s process, each site answers in its own."""\n'
         b"server = client = None\n")


def build_fab() -> bytes:
    """The app bundle submitted for a fit (a pyproject.toml and two lines of glue)."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files({"pyproject.toml": _PYPROJECT.encode(), "fedglmm_site_app/__init__.py": _GLUE})
    return fab


def _read_root_certificates(path) -> bytes | None:
    if path is None:
        return None
    from pathlib import Path

    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FederationError(f"cannot read the CA certificate '{path}': {e.strerror or e}") from None


class _SuperLink:
    """The SuperLink's Control and Runtime APIs as the analyst's process uses them: start a run, and take
    over its ServerApp task."""

    def __init__(self, address: str, insecure: bool, certs):
        import httpx

        self.address, self.insecure, self.certs = address, insecure, certs
        self.http_errors = httpx.HTTPError
        self._status_error = httpx.HTTPStatusError

    def client(self, cls, *interceptors):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        return cls.from_server_address(server_address=self.address, insecure=self.insecure,
                                       root_certificates=self.certs,
                                       interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
                                                     *interceptors])

    def unreachable(self, exc) -> FederationError:
        if isinstance(exc, self._status_error) and exc.response.status_code == 403:
            return FederationError(f"the SuperLink at {self.address} takes fits only from its own machine: run "
                                   "the fit on the coordinator with --federation 127.0.0.1:PORT")
        return FederationError(f"cannot reach the SuperLink at {self.address}: {_one_line(exc)}")

    def start_run(self) -> int:
        """Submit the app bundle (configuration only) with the Control API; the run's id."""
        from flwr.common.serde import fab_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.control.control_http_client import ControlHttpClient
        from flwr.supercore.fab import Fab

        fab = build_fab()
        control = self.client(ControlHttpClient)
        try:
            res = control.StartRun(StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {}))))
        except self.http_errors as exc:
            raise self.unreachable(exc) from None
        finally:
            control.close()
        if not res.HasField("run_id"):
            raise FederationError(f"the SuperLink at {self.address} did not start a run")
        return res.run_id

    def acquire(self, run_id: int) -> str:
        """Acquire our run's ServerApp task (its token); an older pending one (a fit that never started) is
        closed."""
        from flwr.common.constant import SubStatus
        from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest, PushTaskOutputRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors.http.runtime_token import RuntimeTokenHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        runtime = self.client(RuntimeHttpClient)
        deadline = time.monotonic() + 30.0
        try:
            while True:
                got = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP.value]))
                if got.HasField("task") and got.token:
                    if got.task.run_id == run_id:
                        return got.token
                    stale = self.client(RuntimeHttpClient, RuntimeTokenHttpInterceptor(token=got.token))
                    try:
                        stale.PullTaskInput(PullTaskInputRequest())
                        stale.PushTaskOutput(PushTaskOutputRequest(sub_status=SubStatus.FAILED,
                                                                   details="superseded by a newer fedglmm fit"))
                    finally:
                        stale.close()
                    continue
                if time.monotonic() > deadline:
                    raise FederationError(f"the SuperLink at {self.address} did not hand over run {run_id}; is "
                                          "it started with 'fedglmm coordinator start' (isolation process)?")
                time.sleep(0.05)
        except self.http_errors as exc:
            raise self.unreachable(exc) from None
        finally:
            runtime.close()


@contextmanager
def federation(address: str, *, root_certificates=None, insecure: bool = False, sites: int | None = None,
               timeout: float = 60.0, connect_timeout: float | None = None, poll: float = 0.05,
               on_round: Callable[[int, str], None] | None = None) -> Iterator[FlowerTransport]:
    """Start a run at the SuperLink ``address`` and yield a connected :class:`FlowerTransport`.

    ``address`` is the SuperLink's local HTTPS address (``127.0.0.1:9092`` on the coordinator);
    ``root_certificates`` the CA certificate that signed its server certificate.
    """
    _import_flower()
    from flwr.common.constant import SubStatus
    from flwr.common.serde import run_from_proto
    from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors.http.runtime_token import RuntimeTokenHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid import HttpGrid

    link = _SuperLink(address, insecure, None if insecure else _read_root_certificates(root_certificates))
    short_object_backoff()
    token = link.acquire(link.start_run())
    client, certs = link.client, link.certs
    task = client(RuntimeHttpClient, RuntimeTokenHttpInterceptor(token=token))
    grid = HttpGrid(runtime_api_address=address, insecure=insecure, root_certificates=certs, token=token)
    heartbeat, inp = None, None
    status, details = SubStatus.FAILED, "the fit did not finish"
    try:
        try:
            inp = task.PullTaskInput(PullTaskInputRequest())
        except link.http_errors as exc:
            raise link.unreachable(exc) from None
        grid.set_run(run_from_proto(inp.run))
        # Flower's Message() stamps messages with the identity of the task process: ours
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = \
            inp.task_id, inp.run.run_id, inp.context.node_id
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(task))
        heartbeat.start()
        transport = FlowerTransport(grid, expected=sites, timeout=timeout,
                                    connect_timeout=timeout if connect_timeout is None else connect_timeout,
                                    poll=poll, on_round=on_round)
        try:
            yield transport
        except FedGLMMError as exc:
            details = _one_line(exc)
            raise
        status, details = SubStatus.COMPLETED, ""
    finally:
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        try:
            task.PushTaskOutput(PushTaskOutputRequest(context=inp.context if inp is not None else None,
                                                      sub_status=status, details=details))
        except Exception:  # noqa: BLE001 - best effort: the run is over either way
            pass
        task.close()
        grid.close()
