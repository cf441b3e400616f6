"""Secure aggregation at the site: its sums leave only masked, so the coordinator learns the total over
sites and nothing of one site's sums.

Protocol (pairwise additive masking, Bonawitz et al., CCS 2017, without the dropout recovery: a fit
needs every site in every round):

1. **Key agreement.**  A request carrying ``secagg: {"fit": F, "hello": true}`` (the fit's first round,
   ``describe`` or ``oneshot``, or a ``keys`` request) makes the site draw a fresh X25519 key pair for
   fit F, and its reply carries the public key (``secagg_key``).  The coordinator relays every site's
   public key to every site in the next requests: ``secagg: {"fit": F, "round": r, "keys": {site: key}}``.
   Site i and site j then share s_ij = HKDF-SHA256(X25519(i, j), salt = F, info = the two site ids),
   which the coordinator cannot compute.
2. **Masking.**  The site's reply to such a request keeps every value that is not a sum (names, counts,
   per-group modes) and turns all its sums into one vector v (:func:`fedglmm.protocol.split_sums`),
   encoded exactly as ring integers (:func:`fedglmm.protocol.to_ring`: Z / 2^2176, every finite float64
   exactly).  It sends v + Σ_{j > i} m_ij − Σ_{j < i} m_ji (sites ordered by id), where m_ij is the
   ChaCha20 keystream under key s_ij and a nonce holding the round r.  The masks cancel in the sum over
   sites, and one site's masked vector is uniformly distributed for anyone without its keys.  One more
   ring value per summed field counts the site's non-finite values (which are sent as 0): the total says
   only whether some site had one.
3. **Rounds.**  A site masks each round number of a fit once: the same request again gets the same reply,
   a different request with a used round number is refused (masks used twice would let their
   difference reveal the difference of two sums).  Keys live in memory for the fit only.

What this does not protect against is listed in the README (an active coordinator that forges keys,
sites that collude with the coordinator).  X25519, HKDF and ChaCha20 are the ``cryptography`` package's.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from .. import protocol
from ..errors import FedGLMMError

INFO = b"fedglmm secure aggregation v1"
MASKED_KINDS = ("setup", "evaluate", "finalize")
MAX_FITS = 4                       # keys kept for the most recent fits only
_FIT_ID = re.compile(r"^[0-9a-f]{16,128}$")


def _crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError:                                     # pragma: no cover - a core dependency
        raise FedGLMMError("secure aggregation needs the cryptography package: pip install cryptography") from None
    return hashes, serialization, X25519PrivateKey, X25519PublicKey, Cipher, algorithms, HKDF


def keystream(seed: bytes, round_: int, rows: int) -> np.ndarray:
    """The mask m for one pair and one round: ChaCha20(seed, nonce = round) as ring integers (rows, L)."""
    *_, Cipher, algorithms, _hkdf = _crypto()
    nonce = (0).to_bytes(4, "little") + int(round_).to_bytes(8, "little") + b"\0" * 4
    n = rows * protocol.RING_LIMBS * 8
    enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(n)), dtype="<u8").reshape(rows, protocol.RING_LIMBS).astype(np.uint64)


class SecureAggregation:
    """One site's keys and masking state, fit by fit."""

    def __init__(self, site_id: str):
        self.site_id = site_id
        self._fits: dict[str, dict] = {}

    def check(self, kind, req: dict, config, refuse) -> None:
        """Before any work: a site that requires secure aggregation refuses requests whose sums would
        leave unmasked (``refuse(what, rule)`` raises)."""
        sa = req.get("secagg")
        if not config.require_secure_aggregation:
            return
        masked = isinstance(sa, dict) and "round" in sa
        hello = isinstance(sa, dict) and sa.get("hello") is True
        if (kind in MASKED_KINDS and not masked) or (kind == "oneshot" and not hello):
            refuse(f"{kind} without secure aggregation: its sums would leave unmasked", "require_secure_aggregation")

    def apply(self, kind, req: dict, reply: dict, request: bytes) -> dict:
        """The reply as it leaves under the request's ``secagg`` field: with this site's public key (a key
        exchange; a one-shot reply then drops its site totals, which come masked in the set-up round, and its own
        fit's conditional modes), or with its sums masked."""
        sa = req.get("secagg")
        if sa is None:
            return reply
        if isinstance(sa, dict) and sa.get("hello") is True:
            out = dict(reply, secagg_key=self.public_key(sa))
            if kind == "oneshot":
                out.pop("sums", None)
                if isinstance(out.get("local"), dict) and "modes" in out["local"]:
                    # (a shared level's modes would show its sums, which leave here masked alone)
                    out["local"] = {k: v for k, v in out["local"].items() if k != "modes"}
            return out
        if kind not in MASKED_KINDS:
            self._bad(f"a {kind} reply holds no sums to mask")
        return self.mask(sa, reply, request)

    def _bad(self, what: str):
        raise FedGLMMError(f"site '{self.site_id}': refused a secure-aggregation request ({what})")

    def _fit(self, sa) -> str:
        if not isinstance(sa, dict) or not isinstance(sa.get("fit"), str) or not _FIT_ID.match(sa["fit"]):
            self._bad("the fit id must be 16 to 128 lowercase hex digits")
        return sa["fit"]

    def public_key(self, sa) -> str:
        """This site's public key for the fit in ``sa`` (drawn at the fit's first request)."""
        fit = self._fit(sa)
        if fit not in self._fits:
            _, serialization, X25519PrivateKey, *_ = _crypto()
            key = X25519PrivateKey.generate()
            raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self._fits[fit] = {"fit": fit, "key": key, "public": raw.hex(), "seeds": None, "round": -1,
                               "last": None}
            while len(self._fits) > MAX_FITS:
                self._fits.pop(next(iter(self._fits)))
        return self._fits[fit]["public"]

    def mask(self, sa, reply: dict, request: bytes) -> dict:
        """The reply with its sums masked for round ``sa["round"]`` of fit ``sa["fit"]``."""
        fit = self._fit(sa)
        state = self._fits.get(fit)
        if state is None:
            self._bad("no key was agreed for this fit (the key exchange comes first)")
        round_ = sa.get("round")
        if not isinstance(round_, int) or isinstance(round_, bool) or not 0 <= round_ < 2 ** 63:
            self._bad("the round must be a whole number ≥ 0")
        digest = hashlib.sha256(request).digest()
        if round_ <= state["round"]:
            if round_ == state["round"] and state["last"] is not None and state["last"][0] == digest:
                return state["last"][1]
            self._bad(f"round {round_} of this fit was already masked; masks are never used twice")
        peers = self._peers(sa.get("keys"), state)
        layout, values, rest = protocol.split_sums(reply)
        flags = np.array([0.0 if np.all(np.isfinite(v)) else 1.0 for v in _fields(layout, values)])
        plain = np.concatenate([np.where(np.isfinite(values), values, 0.0), flags])
        masked = protocol.to_ring(plain)
        for other, seed in peers:
            m = keystream(seed, round_, len(plain))
            masked = protocol.ring_add(masked, m if self.site_id < other else protocol.ring_neg(m))
        out = dict(rest, secagg={"layout": layout, "masked": masked})
        state["round"], state["last"] = round_, (digest, out)
        return out

    def _peers(self, keys, state) -> list[tuple[str, bytes]]:
        """(site, shared seed) for every other site in the fit's key table."""
        if not isinstance(keys, dict) or len(keys) < 2 or not all(isinstance(k, str) and isinstance(v, str)
                                                                  for k, v in keys.items()):
            self._bad("the key table must name at least two sites and their keys")
        if keys.get(self.site_id) != state["public"]:
            self._bad("the key table does not hold this site's own key")
        table = tuple(sorted(keys.items()))
        if state["seeds"] is not None and state["seeds"][0] == table:
            return state["seeds"][1]
        hashes, _, _, X25519PublicKey, _c, _a, HKDF = _crypto()
        peers = []
        for other, pub in table:
            if other == self.site_id:
                continue
            try:
                shared = state["key"].exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(pub)))
            except ValueError:
                self._bad(f"the key of site '{other}' is not a valid X25519 public key")
            low, high = sorted((self.site_id, other))
            info = INFO + b"\0" + low.encode() + b"\0" + high.encode()
            seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes.fromhex(state["fit"]),
                        info=info).derive(shared)
            peers.append((other, seed))
        state["seeds"] = (table, peers)
        return peers


def _fields(layout, values):
    pos = 0
    for _, shape in layout:
        size = 1 if shape is None else int(np.prod(shape, dtype=np.int64))
        yield values[pos: pos + size]
        pos += size
