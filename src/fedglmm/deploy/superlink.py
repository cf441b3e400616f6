"""The coordinator's SuperLink, with only the Fleet API open to other machines.

Flower 1.41's SuperLink serves its Fleet API (for SuperNodes), Control API (submitting runs) and Runtime
API (the process driving a run) on one HTTPS port, and the open-source Control and Runtime APIs do not
authenticate their callers.  ``fedglmm coordinator start`` therefore runs Flower's own SuperLink
application (``flower-superlink``'s options, parsed by Flower) behind :class:`LoopbackGuard`: a request
from any peer that is not a loopback address gets ``403`` unless its path is in the Fleet API
(``/v1/fleet/``).  Sites reach the Fleet API; submitting a run and driving it is only possible on the
coordinator machine itself.  If a reverse proxy on the same host forwards outside traffic, it must
forward only ``/v1/fleet/`` (its requests arrive from loopback).

A site that restarts (a crash, a reboot) presents the same authentication key again; Flower would refuse
it until the SuperLink has given up on its previous connection (two missed heartbeats, about a minute).
:func:`let_sites_reconnect` lets the owner of the key take its node over at once instead, so a site that
comes back within a fit's timeout is let in and its round retried (:mod:`fedglmm.transport.flower`).

Run as ``python -m fedglmm.deploy.superlink <flower-superlink options>``.
"""
from __future__ import annotations

import ipaddress
import sys

FLEET_PREFIX = "/v1/fleet/"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LoopbackGuard:
    """ASGI wrapper: non-loopback peers may use the Fleet API only."""

    def __init__(self, app, open_prefixes=(FLEET_PREFIX,)):
        self.app = app
        self.open_prefixes = tuple(open_prefixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            peer = client[0] if client else None
            if not is_loopback(peer) and not scope.get("path", "").startswith(self.open_prefixes):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"only the Fleet API is served to other machines\n"
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def let_sites_reconnect() -> None:
    """Flower's node activation, accepting a node still marked online: an authenticated SuperNode that
    activates again replaces its previous connection (which is gone: the same key cannot be online twice)."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    for cls in (SqlLinkState, InMemoryLinkState):
        original = cls.activate_node
        if getattr(original, "_fedglmm", False):
            continue

        def activate_node(self, node_id, heartbeat_interval, _original=original):
            if _original(self, node_id, heartbeat_interval):
                return True
            self.deactivate_node(node_id)
            return _original(self, node_id, heartbeat_interval)

        activate_node._fedglmm = True
        cls.activate_node = activate_node


def serve(flower_args: list[str]) -> None:
    """Run Flower's SuperLink with ``flower_args`` (its own command-line options), guarded."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    argv = sys.argv
    sys.argv = ["flower-superlink", *flower_args]
    try:
        config = _parse_superlink_lifespan_config()
    finally:
        sys.argv = argv
    let_sites_reconnect()
    app = LoopbackGuard(create_app(config, SuperLinkLifespan))
    uvicorn.run(app=app, host=config.host, port=config.port, reload=False, access_log=False,
                log_config=get_uvicorn_log_config(console_handler.level),
                ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1)


if __name__ == "__main__":
    serve(sys.argv[1:])
