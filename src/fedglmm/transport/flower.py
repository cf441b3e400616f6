"""A transport over a Flower federation: the coordinator's rounds travel as Flower messages.

Design (Flower 1.41)
--------------------
Flower's SuperLink serves three APIs over one HTTPS port: the Fleet API (SuperNodes pull messages and
push replies), the Control API (``flwr run`` submits a run: an app bundle, FAB) and the Runtime API (the
process running a run's ServerApp pushes and pulls messages with a per-task token).  Started with
``--isolation process``, the SuperLink does not launch ServerApps itself: a run waits, as a pending
task, until some process acquires it on the Runtime API and receives its token.

``fedglmm fit --federation HOST:PORT`` uses exactly that, so the analyst's own process runs the Newton
loop and keeps the in-memory :class:`~fedglmm.results.FitResult`:

1. it builds a small FAB in memory (a pyproject.toml naming the app; no code) and submits it with the
   Control API's ``StartRun``;
2. it acquires the run's ServerApp task on the Runtime API (as Flower's SuperExec would, but without
   launching anything), pulls the task input, and keeps the task alive with heartbeats;
3. it drives a :class:`FlowerTransport` on Flower's ``HttpGrid`` with that token: every round pushes
   one ``query`` message per site, whose ConfigRecord holds the encoded request bytes, and polls for the
   replies every ``poll`` seconds (Flower's own ``send_and_receive`` sleeps 3 s between polls);
4. it reports the task completed (or failed, with the one-line reason) and returns the fit.

At each site, ``fedglmm site start`` runs the SuperNode in process isolation and answers the run's
ClientApp tasks itself with :meth:`fedglmm.site.Site.handle` (see :mod:`fedglmm.deploy.node`), adding
its site id to each reply; the FAB is never loaded there.  Node ids are mapped to site ids by a first
identification round (an empty request) that is not counted in ``rounds`` or the byte totals.

The Control and Runtime APIs have no authentication in open-source Flower; ``fedglmm coordinator
start`` therefore refuses them to any peer that is not on the coordinator's loopback interface (see
:mod:`fedglmm.deploy.superlink`), and ``fedglmm fit --federation`` runs on the coordinator machine (or
through an SSH tunnel to it).

Faults never give a partial fit: a site that does not reply within ``timeout`` seconds, a Flower error
reply (the ClientApp failed, the node went away) or a refusal by the site ends the fit with one line
naming the site and the round.  Flower is imported only in this module and :mod:`fedglmm.deploy`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .. import protocol
from ..errors import FedGLMMError, SiteRefusal
from .recovery import RECORD, FederationError, Recovery, Round, _record

APP_NAME = "fedglmm-site"


def _import_flower():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FederationError("--federation needs Flower: pip install 'fedglmm[flower]'") from None


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g} s"


@dataclass
class FlowerTransport:
    """The :class:`~fedglmm.transport.Transport` protocol on a Flower ``Grid``.

    ``expected``: the number of sites to wait for (None: all nodes connected when the fit starts, at
    least one); ``connect_timeout``: how long to wait for them; ``timeout``: how long one round may take.
    """

    grid: object
    federated = True          # sites across a network: secure aggregation is on by default (3+ sites)
    expected: int | None = None
    timeout: float = 60.0
    connect_timeout: float = 60.0
    poll: float = 0.05
    on_round: Callable[[int, str], None] | None = None
    rounds: int = 0
    bytes_to_sites: int = 0
    bytes_from_sites: int = 0
    nodes: dict = field(default_factory=dict)       # site id -> node id
    instances: dict = field(default_factory=dict)   # site id -> the id of its running process
    probe_every: float = 1.0                        # seconds between probes of a silent site
    recovery: Recovery = field(default_factory=Recovery)

    @property
    def site_ids(self) -> list[str]:
        if not self.nodes:
            self.connect()
        return list(self.nodes)

    # --- one exchange -----------------------------------------------------------------------------
    def _push(self, payload: bytes, node_ids, what: str) -> dict[str, int]:
        """Send ``payload`` to each node; return message id -> node id."""
        from flwr.app import ConfigRecord, Message, RecordDict

        messages = [Message(RecordDict({RECORD: ConfigRecord({"request": payload})}), dst_node_id=nid,
                            message_type="query", ttl=max(self.timeout, 1.0) + 30.0)
                    for nid in node_ids]
        try:
            ids = list(self.grid.push_messages(messages))
        except Exception as exc:  # noqa: BLE001 - the SuperLink's own failure, as one line
            raise FederationError(f"could not send {what} to the SuperLink: {_one_line(exc)}") from None
        if len(ids) != len(messages) or any(not i for i in ids):
            raise FederationError(f"the SuperLink did not accept {what}")
        return {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages)}

    def _collect(self, pending: dict[str, int], names: dict[int, str], what: str, deadline: float,
                 partial: bool = False) -> dict[int, tuple[str, bytes]]:
        """Pull replies until none is pending or ``deadline``; then raise, or return what came if ``partial``.

        Removes answered messages from ``pending``; returns node id -> (site id, reply bytes, instance).  With
        ``partial``, a Flower error reply (a node that went away) leaves that node out instead of raising.
        """
        out: dict[int, tuple[str, bytes]] = {}
        while pending:
            try:
                replies = list(self.grid.pull_messages(list(pending)))
            except Exception as exc:  # noqa: BLE001
                raise FederationError(f"lost the SuperLink during {what}: {_one_line(exc)}") from None
            for rep in replies:
                nid = pending.pop(rep.metadata.reply_to_message_id, None)
                if nid is None:
                    continue
                name = names.get(nid, f"node {nid}")
                if rep.has_error() and partial:
                    continue
                if rep.has_error():
                    raise FederationError(f"{name} failed {what}: {_one_line(rep.error.reason)}")
                out[nid] = _record(rep, name, what)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(self.poll)
        if pending and not partial:
            silent = ", ".join(sorted(names.get(n, f"node {n}") for n in pending.values()))
            raise FederationError(f"{silent} did not answer {what} within {_fmt_s(self.timeout)}")
        return out

    # --- which node is which site -----------------------------------------------------------------
    def _connected(self) -> list[int]:
        try:
            return sorted(int(n) for n in self.grid.get_node_ids())
        except Exception as exc:  # noqa: BLE001
            raise FederationError(f"cannot list the sites at the SuperLink: {_one_line(exc)}") from None

    def connect(self) -> None:
        """Wait for the sites and learn each node's site id (an identification round, not counted).

        A node that the SuperLink still lists but that does not answer (a site that went away without
        signing off) is left out; the fit needs ``expected`` sites that answer (all listed nodes that
        answer, at least one, when ``expected`` is None).
        """
        want = self.expected
        what = "the identification round"
        deadline = time.monotonic() + self.connect_timeout
        asked: dict[str, int] = {}
        ident: dict[int, str] = {}
        while True:
            listed = self._connected()
            new = [n for n in listed if n not in ident and n not in asked.values()]
            if new:
                asked.update(self._push(b"", new, what))
            got = self._collect(asked, {}, what, min(time.monotonic() + 0.5, deadline), partial=True)
            ident.update({nid: sid for nid, (sid, _, _) in got.items()})
            self.instances.update({sid: inst for sid, _, inst in got.values()})
            done = len(ident) >= want if want is not None else bool(ident) and not asked
            if done:
                break
            if time.monotonic() > deadline:
                if want is None and ident:
                    break
                have = len(ident)
                need = str(want) if want is not None else "at least 1"
                raise FederationError(f"{have} site{'s' if have != 1 else ''} answered at the federation, "
                                      f"expected {need}; waited {_fmt_s(self.connect_timeout)}")
        by_site: dict[str, int] = {}
        for nid, sid in ident.items():
            if sid in by_site:
                raise FederationError(f"two connected sites call themselves '{sid}'")
            by_site[sid] = nid
        if want is not None and len(by_site) > want:
            raise FederationError(f"{len(by_site)} sites answered at the federation "
                                  f"({', '.join(sorted(by_site))}), expected {want}")
        self.nodes = dict(sorted(by_site.items()))

    # --- the Transport protocol -------------------------------------------------------------------
    def broadcast(self, message: dict) -> dict[str, dict]:
        """One round: the same request to every site, one reply from each (decoded).

        A site that restarts within the round's timeout is let back in (:mod:`fedglmm.transport.recovery`)."""
        if not self.nodes:
            self.connect()
        self.rounds += 1
        kind = message.get("kind", "")
        got = Round(self, message, f"round {self.rounds} ({kind})").run()
        replies = {}
        for sid in self.nodes:
            sent, out = got[sid]
            self.bytes_to_sites += sent
            self.bytes_from_sites += len(out)
            replies[sid] = protocol.decode(out)
        if self.on_round is not None:
            self.on_round(self.rounds, kind)
        for sid, rep in replies.items():
            if "error" in rep:
                raise SiteRefusal(rep["error"])
        return replies


def short_object_backoff(initial: float = 0.02, cap: float = 0.5) -> None:
    """Retry a not-yet-available Flower object after ``initial`` s (doubling up to ``cap``), not 1 s.

    A reply's payload can be announced a moment before it is uploaded; Flower 1.41 then waits 1 s (then
    2, 4, ... up to 10 s) before pulling again, which would add a second to many of our short rounds.
    This changes the defaults of Flower's two pull helpers in this process only.
    """
    from flwr.supercore.inflatable import inflatable_utils as iu

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        kw = fn.__kwdefaults__
        if kw is not None and "initial_backoff" in kw:
            kw["initial_backoff"], kw["backoff_cap"] = initial, cap


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
