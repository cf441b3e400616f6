"""Flower's SuperNode with a shorter wait between its polls of the SuperLink.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none it sleeps a fixed 3 s
(and 0.5 s while it waits for its ClientApp's reply).  A fedglmm fit is a chain of short rounds, so that
wait would dominate every round.  This runs Flower's own ``flower-supernode`` (same options) with those
sleeps capped at ``FEDGLMM_SUPERNODE_POLL`` seconds (default 0.1): a site then asks the coordinator for
work about ten times a second while it is connected, a few hundred bytes per request.  It also retries
a message part that is not there yet after 0.02 s instead of 1 s
(:func:`fedglmm.transport.flower.short_object_backoff`).

Run as ``python -m fedglmm.deploy.supernode <flower-supernode options>``.
"""
from __future__ import annotations

import os
import sys
import time as _time


class _ShortSleep:
    """Stands in for the ``time`` module inside Flower's SuperNode loop only."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))

    def __getattr__(self, name):
        return getattr(_time, name)


def main(argv: list[str]) -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap = float(os.environ.get("FEDGLMM_SUPERNODE_POLL", "0.1"))
    start_client_internal.time = _ShortSleep(cap)
    from ..transport.flower import short_object_backoff

    short_object_backoff()
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
