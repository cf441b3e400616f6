"""The in-process transport: sites are objects in this process, but every message still goes as bytes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from .. import protocol
from ..errors import SiteRefusal


class Transport(Protocol):
    """What the coordinator needs from a transport."""

    site_ids: list[str]
    rounds: int
    bytes_to_sites: int
    bytes_from_sites: int

    def broadcast(self, message: dict) -> dict[str, dict]: ...


@dataclass
class InProcessTransport:
    """Sites as local objects with a ``handle(bytes) -> bytes`` method (see :class:`fedglmm.site.Site`)."""

    sites: dict
    on_round: Callable[[int, str], None] | None = None
    rounds: int = 0
    bytes_to_sites: int = 0
    bytes_from_sites: int = 0

    @property
    def site_ids(self) -> list[str]:
        return list(self.sites)

    def broadcast(self, message: dict) -> dict[str, dict]:
        """One round: the same request to every site, one reply from each (decoded)."""
        data = protocol.encode(message)
        self.rounds += 1
        replies = {}
        for sid, site in self.sites.items():
            self.bytes_to_sites += len(data)
            out = site.handle(data)
            self.bytes_from_sites += len(out)
            replies[sid] = protocol.decode(out)
        if self.on_round is not None:
            self.on_round(self.rounds, message.get("kind", ""))
        for sid, rep in replies.items():
            if "error" in rep:
                raise SiteRefusal(rep["error"])
        return replies
