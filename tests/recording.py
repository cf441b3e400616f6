"""A site wrapper for tests: it keeps the exact bytes each request brought and each reply took away."""
from __future__ import annotations

from fedglmm import protocol


class Recorder:
    """Wraps a :class:`fedglmm.site.Site` (anything with ``handle(bytes) -> bytes``)."""

    def __init__(self, site):
        self.site, self.calls = site, []

    def handle(self, data: bytes) -> bytes:
        out = self.site.handle(data)
        self.calls.append((data, out))
        return out

    @property
    def replies(self) -> list[dict]:
        """The replies, decoded."""
        return [protocol.decode(out) for _, out in self.calls]
