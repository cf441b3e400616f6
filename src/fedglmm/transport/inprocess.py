"""The in-process transport: sites are objects in this process, but every message still goes as bytes.

The sites of a round are independent and the coordinator waits for the slowest, so they answer in
parallel, one thread per core (their heavy work -- numpy and the compiled likelihood kernel -- runs
without the interpreter lock), with BLAS held at one thread meanwhile (:mod:`fedglmm.likelihood.blas`);
small sites answer one after the other (their work is then mostly the interpreter's, which threads cannot
share: :func:`~fedglmm.likelihood.fused.threads_pay`).
Sites that keep an audit log answer one after the other, so the lines they append keep the order of the
sites.  ``timings`` records, for every round, its wall time and each
site's own CPU time (``benchmarks/bench_scale.py`` reads it).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .. import protocol
from ..errors import SiteRefusal
from ..likelihood import fused
from ..likelihood.blas import single_blas
from ..likelihood.fused import threads_pay

_POOL: ThreadPoolExecutor | None = None


def workers() -> int:
    """Threads the in-process sites use: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):          # not on Linux
        return max(1, os.cpu_count() or 1)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="fedglmm-site")
    return _POOL


class Transport(Protocol):
    """What the coordinator needs from a transport."""

    site_ids: list[str]
    rounds: int
    bytes_to_sites: int
    bytes_from_sites: int

    def broadcast(self, message: dict) -> dict[str, dict]: ...


def _answer(site, data: bytes, kernel_rows: int | None = None) -> tuple[bytes, float]:
    """A site's reply and the CPU seconds its thread spent on it; its engines use the compiled kernel from
    ``kernel_rows`` rows (:func:`~fedglmm.likelihood.fused.rows_from`; None: the default)."""
    t0 = time.thread_time()
    if kernel_rows is None:
        out = site.handle(data)
    else:
        with fused.rows_from(kernel_rows):
            out = site.handle(data)
    return out, time.thread_time() - t0


@dataclass
class InProcessTransport:
    """Sites as local objects with a ``handle(bytes) -> bytes`` method (see :class:`fedglmm.site.Site`)."""

    sites: dict
    on_round: Callable[[int, str], None] | None = None
    rounds: int = 0
    bytes_to_sites: int = 0
    bytes_from_sites: int = 0
    parallel: bool = os.environ.get("FEDGLMM_SERIAL") is None
    timings: list = field(default_factory=list)   # per round: {"kind", "wall", "site_cpu": {site: s}}

    @property
    def site_ids(self) -> list[str]:
        return list(self.sites)

    def _kernel_rows(self) -> int | None:
        """The rows from which the sites' engines use the compiled kernel: any (0) where several sites hold
        :data:`~fedglmm.likelihood.fused.MIN_ROWS` rows together -- they share this process and the kernel's
        load -- else None (the default; a site that does not say how many rows it holds counts as many)."""
        sizes = []
        for site in self.sites.values():
            frame = getattr(site, "frame", None)
            sizes.append(len(frame) if frame is not None else fused.MIN_ROWS)
        return 0 if len(sizes) > 1 and sum(sizes) >= fused.MIN_ROWS else None

    def _in_parallel(self) -> bool:
        return self.parallel and len(self.sites) > 1 and workers() > 1 and threads_pay(self.sites.values()) \
            and not any(getattr(site, "audit", None) is not None for site in self.sites.values())

    def broadcast(self, message: dict) -> dict[str, dict]:
        """One round: the same request to every site, one reply from each (decoded)."""
        data = protocol.encode(message)
        self.rounds += 1
        t0 = time.perf_counter()
        rows = self._kernel_rows()
        if self._in_parallel():
            with single_blas():          # one BLAS thread per site thread: no more threads than cores
                futures = {sid: _pool().submit(_answer, site, data, rows) for sid, site in self.sites.items()}
                answers = {sid: f.result() for sid, f in futures.items()}
        else:
            answers = {sid: _answer(site, data, rows) for sid, site in self.sites.items()}
        self.timings.append({"kind": message.get("kind", ""), "wall": time.perf_counter() - t0,
                             "site_cpu": {sid: a[1] for sid, a in answers.items()}})
        replies = {}
        for sid, (out, _) in answers.items():
            self.bytes_to_sites += len(data)
            self.bytes_from_sites += len(out)
            replies[sid] = protocol.decode(out)
        if self.on_round is not None:
            self.on_round(self.rounds, message.get("kind", ""))
        for sid, rep in replies.items():
            if "error" in rep:
                raise SiteRefusal(rep["error"])
        return replies
