"""A fitted model's line back to its sites: the rounds that come after the fit.

Model comparison (an ML refit of a REML fit), profile intervals and the diagnostics round ask the sites
for more sums at points of the fitted model.  A :class:`Session` keeps what those rounds need -- the
transport, the fit's internal scale (:class:`~fedglmm.likelihood.setup.Setup`), its estimate and options
-- and counts the rounds, bytes and time they cost, apart from the fit's own.  It lives as long as its
transport does: in-process sites always; a federation only until its run ends (then :meth:`broadcast`
fails with one line).

Every request of a session carries the fit's set-up payload (as the hybrid's first request does): a site
that has built that design already keeps it (and its warm-started state), and one that has not, or has
built another model's since (several fits over the same sites), builds it first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import FedGLMMError
from ..likelihood.fit import Estimate
from ..likelihood.setup import Setup
from ..model.families import Family
from ..model.options import FitOptions
from ..model.spec import ModelSpec, Schema


class SessionClosed(FedGLMMError):
    """The sites of a fit can no longer be reached (its federation run has ended, or it was fitted from
    summary files)."""


@dataclass
class Usage:
    """Rounds, bytes and seconds spent after the fit, by purpose (``"profile"``, ``"diagnostics"``, ...)."""

    rounds: dict = field(default_factory=dict)
    bytes_to_sites: dict = field(default_factory=dict)
    bytes_from_sites: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def add(self, purpose: str, rounds: int, to: int, back: int, seconds: float) -> None:
        for d, v in ((self.rounds, rounds), (self.bytes_to_sites, to), (self.bytes_from_sites, back),
                     (self.seconds, seconds)):
            d[purpose] = d.get(purpose, 0) + v


@dataclass
class Link:
    """The transport to a fit's sites, shared by every session of that fit, with the fit's set-up payload
    and the usage counts."""

    transport: object
    setup: dict | None = None
    usage: Usage = field(default_factory=Usage)
    closed: bool = False

    def broadcast(self, message: dict, purpose: str) -> dict:
        """One round to every site (the set-up payload riding on it), counted under ``purpose``."""
        if self.closed or self.transport is None:
            raise SessionClosed("the sites of this fit can no longer be reached (its federation run has "
                                "ended, or it was fitted from summary files): ask for this when fitting "
                                "(for example --ci profile or --diagnostics)")
        msg = dict(message)
        if self.setup is not None:
            msg["setup"] = self.setup
        t = self.transport
        r0, b0, f0, t0 = t.rounds, t.bytes_to_sites, t.bytes_from_sites, time.perf_counter()
        try:
            replies = t.broadcast(msg)
        finally:
            self.usage.add(purpose, t.rounds - r0, t.bytes_to_sites - b0, t.bytes_from_sites - f0,
                           time.perf_counter() - t0)
        return replies

    def as_transport(self, purpose: str) -> "_Counted":
        """A transport whose rounds go through this link under ``purpose`` (for the Newton rounds of a
        refit, :func:`fedglmm.coordinator.rounds.estimate`)."""
        return _Counted(self, purpose)


@dataclass
class _Counted:
    link: Link
    purpose: str

    @property
    def site_ids(self):
        return self.link.transport.site_ids

    def broadcast(self, message: dict) -> dict:
        return self.link.broadcast(message, self.purpose)


@dataclass
class Session:
    """A fitted model at its sites: the link and what the rounds after the fit need."""

    link: Link
    formula: str
    family: Family
    options: FitOptions
    spec: ModelSpec
    schema: Schema
    setup: Setup
    estimate: Estimate

    def broadcast(self, message: dict, purpose: str) -> dict:
        return self.link.broadcast(message, purpose)

    def with_estimate(self, estimate: Estimate, options: FitOptions | None = None) -> "Session":
        """The same sites and scale at another estimate (e.g. an ML refit)."""
        return replace(self, estimate=estimate, options=options or self.options)

    @property
    def gaussian(self) -> bool:
        return self.family.name == "gaussian"

    def point(self) -> np.ndarray:
        """The estimate as the sites evaluate it: θ̃ (gaussian) or φ = (γ, θ̃), followed by the log-dispersion ψ
        for a family with one."""
        est = self.estimate
        return np.asarray(est.theta, float) if self.gaussian else np.r_[est.gamma, est.theta, est.disp]
