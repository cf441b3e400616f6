"""A view of a transport that counts its own rounds and bytes: several fits over the same sites (model
comparison) each report what they cost, not the running total of the transport underneath."""
from __future__ import annotations


class Scoped:
    """Forwards :meth:`broadcast` to ``transport`` and counts the rounds and bytes of its own calls."""

    def __init__(self, transport):
        self.transport = transport
        self.rounds = 0
        self.bytes_to_sites = 0
        self.bytes_from_sites = 0

    @property
    def site_ids(self) -> list[str]:
        return list(self.transport.site_ids)

    def broadcast(self, message: dict) -> dict:
        t = self.transport
        r0, b0, f0 = t.rounds, t.bytes_to_sites, t.bytes_from_sites
        try:
            return t.broadcast(message)
        finally:
            self.rounds += t.rounds - r0
            self.bytes_to_sites += t.bytes_to_sites - b0
            self.bytes_from_sites += t.bytes_from_sites - f0
