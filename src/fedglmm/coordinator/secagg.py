"""Secure aggregation at the coordinator: it relays the sites' public keys and adds up their masked
replies, so it holds every round's sums only as the total over sites (the sites' side, and the protocol,
are in :mod:`fedglmm.site.secagg`).

:class:`SecureTransport` wraps any transport.  The first request of a fit (``describe`` or ``oneshot``)
carries the key exchange; ``setup``, ``evaluate`` and ``finalize`` carry the key table and a fresh round
number, and their replies come back as one reply, ``{"(all sites)": total}``: every sum is the total over
sites (:func:`unmask`), and what is not a sum is merged -- counts added, each site's per-group values
(levels, modes, conditional SDs and their derivatives, withheld groups) concatenated, names kept.  The methods need nothing else:
a total is what they add up anyway.  A site that restarts mid-fit (the transport raises
:class:`SiteRestarted` once it is back) has lost its key: the keys are exchanged again and the round is
asked again, with fresh masks, of every site.
"""
from __future__ import annotations

import secrets

import numpy as np

from .. import protocol
from ..errors import FedGLMMError, SiteRestarted

MASKED_KINDS = ("setup", "evaluate", "finalize")
HELLO_KINDS = ("describe", "oneshot", "keys")
TOTAL = "(all sites)"
CONCATENATED = ("levels", "withheld", "modes", "condsd", "dmodes", "dcondsd")
ADDED = ("n", "ngroups")


class SecureTransport:
    """A transport whose masked rounds return only totals (see the module docstring)."""

    secure = True

    def __init__(self, inner, fit_id: str | None = None, retries: int = 3):
        self.inner = inner
        self.fit = fit_id or secrets.token_hex(16)
        self.keys: dict[str, str] = {}
        self.round = 0
        self.retries = retries

    # the counters are the inner transport's: masking adds bytes, not rounds
    site_ids = property(lambda self: self.inner.site_ids)
    rounds = property(lambda self: self.inner.rounds)
    bytes_to_sites = property(lambda self: self.inner.bytes_to_sites)
    bytes_from_sites = property(lambda self: self.inner.bytes_from_sites)

    def broadcast(self, message: dict) -> dict[str, dict]:
        kind = message.get("kind")
        if kind not in MASKED_KINDS:
            return self._hello(message)
        if not self.keys:
            self._hello(protocol.request("keys"))
        for _ in range(self.retries + 1):
            self.round += 1
            sa = {"fit": self.fit, "round": self.round, "keys": dict(self.keys)}
            try:
                replies = self.inner.broadcast(dict(message, secagg=sa))
            except SiteRestarted:
                self._hello(protocol.request("keys"))        # its new key, then the round again
                continue
            return {TOTAL: unmask(replies)}
        raise FedGLMMError(f"round {self.rounds} ({kind}): sites kept restarting; the fit was stopped")

    def _hello(self, message: dict) -> dict[str, dict]:
        replies = self.inner.broadcast(dict(message, secagg={"fit": self.fit, "hello": True}))
        keys = {}
        for sid, rep in replies.items():
            key = rep.pop("secagg_key", None)
            if not isinstance(key, str):
                raise FedGLMMError(f"site '{sid}' did not take part in the key exchange of secure aggregation "
                                   "(an older fedglmm?)")
            keys[sid] = key
        self.keys = keys
        return replies


def unmask(replies: dict[str, dict]) -> dict:
    """The total of the sites' masked replies (the masks cancel), with what is not a sum merged."""
    sites = list(replies)
    layouts = []
    for sid in sites:
        sa = replies[sid].get("secagg")
        if not isinstance(sa, dict) or not isinstance(sa.get("masked"), np.ndarray) \
                or sa["masked"].dtype != np.uint64:
            raise FedGLMMError(f"site '{sid}' sent its sums without masks")
        layouts.append(sa["layout"])
    if any(lay != layouts[0] for lay in layouts[1:]):
        raise FedGLMMError("the sites' masked replies do not have the same fields; they cannot be added")
    total = replies[sites[0]]["secagg"]["masked"]
    for sid in sites[1:]:
        if replies[sid]["secagg"]["masked"].shape != total.shape:
            raise FedGLMMError(f"site '{sid}' sent masked sums of another size")
        total = protocol.ring_add(total, replies[sid]["secagg"]["masked"])
    values = protocol.from_ring(total)
    nfields = len(layouts[0])
    flat, flags = values[: len(values) - nfields], values[len(values) - nfields:]
    flat = _poison(layouts[0], flat, flags)
    rest = _merge([{k: v for k, v in replies[s].items() if k != "secagg"} for s in sites])
    return protocol.join_sums(layouts[0], flat, rest)


def _poison(layout, flat: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """NaN for every field in which some site had a non-finite value (as the plain sum would be)."""
    out, pos = flat.copy(), 0
    for (_, shape), flag in zip(layout, flags):
        size = 1 if shape is None else int(np.prod(shape, dtype=np.int64))
        if flag > 0.5:
            out[pos: pos + size] = np.nan
        pos += size
    return out


def _merge(parts: list, concat: bool = False):
    """One reply from the sites' unmasked parts: counts added, per-group values (under the keys in
    :data:`CONCATENATED`, also per grouping factor) concatenated, the rest kept from the first site."""
    first = parts[0]
    if concat and isinstance(first, np.ndarray):
        return np.concatenate([np.asarray(x).reshape((-1,) + first.shape[1:]) for x in parts if x is not None])
    if concat and isinstance(first, list):
        return [item for x in parts if x is not None for item in x]
    if isinstance(first, list):
        return [_merge([p[i] for p in parts]) for i in range(len(first))]
    if not isinstance(first, dict):
        return first
    out = {}
    for k in dict.fromkeys(k for p in parts for k in p):
        vals = [p[k] for p in parts if k in p]
        if k in ADDED and all(_count(x) for x in vals):
            out[k] = _add(vals)
        else:
            out[k] = _merge(vals, concat or k in CONCATENATED)
    return out


def _count(x) -> bool:
    """A count, or a dict of counts (one per grouping factor)."""
    if isinstance(x, dict):
        return all(_count(v) for v in x.values())
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _add(vals: list):
    """The sum of counts, or of dicts of counts key by key."""
    if isinstance(vals[0], dict):
        return {g: _add([v.get(g, 0) for v in vals]) for g in dict.fromkeys(g for v in vals for g in v)}
    return sum(vals)
