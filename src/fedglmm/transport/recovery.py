"""One round over Flower, surviving a site that restarts: it is let back in and asked again.

A site's process can die mid-fit (a crash, a reboot, ``kill``) and be started again.  Its new process
has its rows but nothing of the fit: no design, no keys.  While a round waits for its replies:

* every reply carries the id of the site process that sent it (``instance``, drawn when the site
  starts); a reply from a new instance means the site restarted;
* a site silent for ``probe_every`` seconds is probed with an identification request (answered at once
  by a live process, queued behind its work by a busy one, never by a dead one), and the nodes the
  SuperLink lists are watched for a new node that names itself as one of the fit's sites (a site without
  node authentication comes back as a new node);
* a Flower error reply (its node went away) leaves the site silent until it comes back or time is up.

A restarted site gets the round's request again, with the fit's set-up riding on it when the round
needs the design (``evaluate``, ``finalize``); its answer is the one it would have given (the same sums
to the precision of the mode finding).  Under secure aggregation the restarted site's key is gone, so
the round cannot be completed with the other sites' replies: :class:`~fedglmm.errors.SiteRestarted` is
raised and the coordinator exchanges keys again and repeats the round with fresh masks
(:class:`fedglmm.coordinator.secagg.SecureTransport`).  A site that is not back when the round's
``timeout`` runs out ends the fit with one line naming it and the round.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import protocol
from ..errors import FedGLMMError, SiteRestarted

NEEDS_DESIGN = ("evaluate", "finalize")


class FederationError(FedGLMMError):
    """The federation could not carry the fit: a site missing, silent or failing, a SuperLink unreachable."""


@dataclass
class Recovery:
    """What a transport keeps to let a restarted site back into the fit."""

    setup: dict | None = None                   # the fit's last set-up request (without its masking)
    stale: set = field(default_factory=set)     # sites restarted since the set-up was last sent to them

    def remember(self, message: dict) -> None:
        if message.get("kind") == "setup":
            self.setup = {k: v for k, v in message.items() if k != "secagg"}
            self.stale.clear()
        elif isinstance(message.get("setup"), dict):
            self.setup = message["setup"]

    def payload(self, sid: str, message: dict, data: bytes) -> bytes:
        """The request for site ``sid``: ``data``, or with the set-up riding on it for a restarted site."""
        if sid in self.stale and message.get("kind") in NEEDS_DESIGN and self.setup is not None \
                and "setup" not in message:
            return protocol.encode(dict(message, setup=self.setup))
        return data


class Round:
    """One broadcast of ``message`` over a :class:`~fedglmm.transport.flower.FlowerTransport`."""

    def __init__(self, transport, message: dict, what: str):
        self.t, self.message, self.what = transport, message, what
        self.data = protocol.encode(message)
        self.masked = isinstance(message.get("secagg"), dict) and "round" in message["secagg"]
        self.pending: dict[str, str] = {}       # message id -> site id (the round's request)
        self.probes: dict[str, int] = {}        # message id -> node id (identification requests)
        self.sent: dict[str, int] = {}          # site id -> bytes sent to it
        self.out: dict[str, tuple[int, bytes]] = {}
        self.failed: dict[str, str] = {}        # site id -> Flower's reason, while it is away
        self.last_probe: dict[int, float] = {}

    def run(self) -> dict[str, tuple[int, bytes]]:
        """site id -> (bytes sent to it, reply bytes)."""
        t = self.t
        t.recovery.remember(self.message)
        for sid in t.nodes:
            self._send(sid)
        deadline = time.monotonic() + t.timeout
        while len(self.out) < len(t.nodes):
            self._pull()
            if len(self.out) == len(t.nodes):
                break
            if time.monotonic() > deadline:
                self._give_up()
            self._probe()
            time.sleep(t.poll)
        return self.out

    def _send(self, sid: str) -> None:
        t = self.t
        payload = t.recovery.payload(sid, self.message, self.data)
        for mid in t._push(payload, [t.nodes[sid]], self.what):
            self.pending[mid] = sid
        self.sent[sid] = self.sent.get(sid, 0) + len(payload)

    def _pull(self) -> None:
        t = self.t
        ids = list(self.pending) + list(self.probes)
        try:
            replies = list(t.grid.pull_messages(ids))
        except Exception as exc:  # noqa: BLE001 - the SuperLink's own failure, as one line
            raise FederationError(f"lost the SuperLink during {self.what}: {_one_line(exc)}") from None
        for rep in replies:
            mid = rep.metadata.reply_to_message_id
            if mid in self.probes:
                nid = self.probes.pop(mid)
                if not rep.has_error():
                    sid, _, instance = _record(rep, f"node {nid}", "a probe")
                    if sid not in t.nodes:
                        self.last_probe[nid] = float("inf")      # another federation member: not ours
                    self._seen(sid, nid, instance)
            elif mid in self.pending:
                sid = self.pending.pop(mid)
                if rep.has_error():
                    self.failed[sid] = _one_line(rep.error.reason)
                    continue
                name, body, instance = _record(rep, f"site '{sid}'", self.what)
                if name != sid:
                    raise FederationError(f"site '{sid}''s node answered {self.what} as site '{name}': another "
                                          "site's process is attached to its SuperNode (two sites given the "
                                          "same --port on one machine?)")
                if self._seen(sid, t.nodes[sid], instance):
                    self.out[sid] = (self.sent[sid], body)
                    if self.message.get("kind") in NEEDS_DESIGN:
                        t.recovery.stale.discard(sid)

    def _seen(self, sid: str, nid: int, instance: str | None) -> bool:
        """A reply or probe answer from ``sid``'s process ``instance`` at node ``nid``: False if the site
        restarted (it is then asked again, or the round raised)."""
        t = self.t
        if sid not in t.nodes or sid in self.out:
            return True
        known = t.instances.get(sid)
        if instance is None or known is None or instance == known:
            return True                  # the same process (or a site that does not say)
        t.instances[sid], t.nodes[sid] = instance, nid
        t.recovery.stale.add(sid)
        self.failed.pop(sid, None)
        self.pending = {m: s for m, s in self.pending.items() if s != sid}
        if self.masked:
            raise SiteRestarted(sid, f"site '{sid}' restarted during {self.what}")
        self._send(sid)
        return False

    def _probe(self) -> None:
        """Probe the silent sites' nodes, and identify nodes the SuperLink lists for the first time."""
        t = self.t
        now = time.monotonic()
        waiting = [t.nodes[sid] for sid in t.nodes if sid not in self.out]
        try:
            listed = t._connected()
        except FederationError:
            listed = []
        known = set(t.nodes.values())
        fresh = [n for n in listed if n not in known]
        due = [n for n in waiting + fresh if now - self.last_probe.get(n, now - t.probe_every * 0.999) >=
               t.probe_every and n not in self.probes.values()]
        if not due:
            return
        self.last_probe.update({n: now for n in due})
        self.probes.update(t._push(b"", due, "a probe"))

    def _give_up(self) -> None:
        missing = sorted(sid for sid in self.t.nodes if sid not in self.out)
        failed = [sid for sid in missing if sid in self.failed]
        if failed:
            sid = failed[0]
            raise FederationError(f"site '{sid}' failed {self.what}: {self.failed[sid]}")
        silent = ", ".join(f"site '{sid}'" for sid in missing)
        raise FederationError(f"{silent} did not answer {self.what} within {self.t.timeout:g} s")


RECORD = "fedglmm"          # the record holding our bytes, both ways


def _record(rep, name: str, what: str) -> tuple[str, bytes, str | None]:
    """(site id, reply bytes, process instance) of a fedglmm reply."""
    try:
        rec = rep.content[RECORD]
        instance = str(rec["instance"]) if "instance" in rec else None
        return str(rec["site"]), bytes(rec["reply"]), instance
    except (KeyError, TypeError):
        raise FederationError(f"{name} sent a reply to {what} that is not fedglmm's") from None


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
