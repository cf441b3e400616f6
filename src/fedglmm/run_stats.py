"""How a fit ran: rounds, bytes each way, seconds and sites (apart from what it found)."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RunStats:
    """How a fit ran: rounds, bytes each way, seconds, and the sites it ran over."""

    rounds: int
    bytes_to_sites: int
    bytes_from_sites: int
    seconds: float
    site_ids: tuple
    secure: bool = False      # secure aggregation: the coordinator saw only totals of the sums

    @classmethod
    def of(cls, transport, t0: float) -> "RunStats":
        """The transport's counts so far, and the time since ``t0`` (``time.perf_counter()``)."""
        return cls(transport.rounds, transport.bytes_to_sites, transport.bytes_from_sites,
                   time.perf_counter() - t0, tuple(transport.site_ids), bool(getattr(transport, "secure", False)))
