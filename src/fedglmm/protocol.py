"""The messages that cross the site boundary, and their serialisation.

Every request from the coordinator and every reply from a site is a plain dictionary of strings,
numbers, lists, dictionaries and numpy arrays, turned into bytes here and back again, even when both
ends live in one process.  What would cross a network is therefore exactly what the tests see and what
the fit counts.  The format is a small, self-describing, pickle-free container:

    b"FGLM" | version (1 byte) | header length (4 bytes, little endian) | JSON header | array buffers

The header is the message with each array replaced by ``{"__array__": i, "dtype": ..., "shape": ...}``;
buffer i follows in order, little-endian, C-contiguous.  Only float64, int64, uint64 (masked sums) and bool
arrays are allowed.

Request kinds (coordinator → site) and what the site answers (``describe``, ``setup`` and ``oneshot`` carry
``na_action: "fail"`` when the fit refuses missing values; without it a site omits its rows with a missing
value in a used column and reports how many as ``omitted`` in its description, only when there are any):

* ``describe`` {formula}: the site's columns, kinds, factor levels, grouping levels and row count; for a
  formula with stateful transforms (``center(x)``, ``poly(x, 2)``, ...) also ``transforms``: per call, the
  count and sums of powers of its argument (:mod:`fedglmm.model.transforms`), from which the coordinator
  pools one state per call;
* ``setup`` {formula, family, link, nagq, reml, schema}: builds the design (``schema`` carries the
  transforms' pooled state as ``transforms`` when the formula has any); answers counts, column
  moments for scaling and the sums of a one-step linearised fit used as starting values;
* ``evaluate`` {points, transform, zscale}: for each point (φ = (β, θ), or θ for gaussian models) the
  log-likelihood sums: value, gradient, Hessian (gaussian: the cross-product sums A, b, c, d and their
  θ-derivatives), as ``{"points": [...]}``; ``third_at`` (a GLMM, not under secure aggregation: a list of
  indices of points) asks for those points' third derivatives too (``third``, as ``finalize`` sends them;
  with ``third_cov`` those with an index among the covariance parameters and a dispersion alone, the others 0);
  with levels shared by sites (the set-up's ``schema`` lists them under ``shared``: {factor: [levels]}) a
  gaussian site sends instead ``sG``, ``sdG``, ``sd2G`` (the sums [Z_v X y]ᵀV_s⁻¹[Z_v X y] over its rows
  and their θ-derivatives, over the shared levels present at the site, whose positions in v are ``scols``;
  masked: over all shared levels, without ``scols``), ``sd``, ``sdd``, ``sd2d`` (log det V_s and its
  derivatives) and ``n`` (:mod:`fedglmm.likelihood.lmm_shared`);
  a binomial or poisson site with shared levels gets points (b, β, θ) -- b the shared effects -- and
  ``gammas`` (one matrix dim(v) × dim(v) per point, the coordinator's prediction of Λ_v C⁻¹ Λ_vᵀ there)
  and sends per point ``h``, ``gh``, ``Hh`` (the maximum over its own random effects of its log-density
  given b, and its gradient and Hessian in (b, β, θ)), ``l``, ``gl`` (the log-determinant of its own
  Laplace curvature and its gradient), ``gc`` (the gradient of ⟨Γ, S_s⟩, S_s its Schur complement for b)
  and ``n``, over the shared levels present at the site (``scols``; masked: over all of them)
  (:mod:`fedglmm.likelihood.glmm_shared`);
* ``finalize`` {point, transform, zscale, ...}: the same sums at the final estimate, and each group's
  conditional modes and conditional standard deviations (a site with rules sends them only for groups
  of at least its ``min_group`` and lists the others under ``withheld``); with shared levels the request
  carries ``shared_v`` and ``shared_N`` (the shared modes and their conditional covariance over σ²) and
  the site answers with the modes of its own levels only; a binomial or poisson fit's final request
  carries ``points`` and ``gammas`` as an ``evaluate`` request (answered as ``points``), the first point
  being the estimate with the shared modes, and ``shared_G`` (their conditional covariance on the scale
  of b): the site adds the modes and SDs of its own levels given them; ``third`` (not under secure
  aggregation) asks for ``third`` too, the third derivatives of its log-likelihood at the point (the
  P(P + 1)(P + 2)/6 distinct entries of a sum over its rows, as the Hessian is one:
  :func:`fedglmm.site.own_third.reply_third`), and with ``quartic`` (a direction v in the parameters) ``quartic``,
  its fourth derivatives along v, Q[v, v] (P × P, a sum over its rows; one grouping factor);
* ``oneshot`` {formula, family, link, order[, transforms]}: the site's whole one-shot message (its description, set-up
  sums and per-group summaries, see :func:`fedglmm.site.summaries.summarize`), or its refusal to send
  per-group summaries for groups below its minimum size;
* ``inspect`` {what, point, transform, zscale, beta_internal, sigma, seed, ...} (after a fit): for each
  item of ``what`` an aggregate at the fitted point -- ``fingerprint``: the row count and a keyed digest
  of the rows and response values the model uses (so fits of the same data can be recognised without
  sending data); ``residuals``: the binned residual aggregates of :mod:`fedglmm.site.diagnostics`;
  ``posterior``: each group's posterior means and SDs of its random effects (adaptive quadrature), with
  the same withholding as the conditional modes.  Sizes depend on the number of bins, groups and
  parameters, never on the number of rows;
* ``keys`` {secagg}: nothing but the site's public key for secure aggregation (a key exchange outside the
  fit's first round, e.g. after a site restarted).

Secure aggregation (:mod:`fedglmm.site.secagg`, :mod:`fedglmm.coordinator.secagg`) adds a field
``secagg`` to requests: ``{"fit", "hello": true}`` asks for the site's public key (``secagg_key`` in the
reply); ``{"fit", "round", "keys"}`` asks for the reply's sums masked, sent as ``secagg: {"layout",
"masked"}`` (ring integers, below) instead of their values.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

MAGIC = b"FGLM"
VERSION = 1
_DTYPES = {"float64": np.float64, "int64": np.int64, "uint64": np.uint64, "bool": np.bool_}
KINDS = ("describe", "setup", "evaluate", "finalize", "oneshot", "inspect", "keys")


class ProtocolError(ValueError):
    """Bytes that are not a valid fedglmm message."""


def encode(message: dict) -> bytes:
    """Serialise a message (see the module docstring) to bytes."""
    buffers: list[bytes] = []

    def conv(obj):
        if isinstance(obj, np.ndarray):
            arr = obj
            if arr.dtype.kind == "f":
                arr = arr.astype("<f8")
            elif arr.dtype == np.uint64:
                arr = arr.astype("<u8")
            elif arr.dtype.kind in "iu":
                arr = arr.astype("<i8")
            elif arr.dtype.kind == "b":
                arr = arr.astype(bool)
            else:
                raise ProtocolError(f"arrays of dtype {arr.dtype} cannot be sent")
            buffers.append(np.ascontiguousarray(arr).tobytes())
            return {"__array__": len(buffers) - 1, "dtype": arr.dtype.name, "shape": list(arr.shape)}
        if isinstance(obj, dict):
            return {str(k): conv(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [conv(v) for v in obj]
        if isinstance(obj, (np.floating, np.integer, np.bool_)):
            return obj.item()
        if obj is None or isinstance(obj, (str, int, float, bool)):
            return obj
        raise ProtocolError(f"values of type {type(obj).__name__} cannot be sent")

    header = json.dumps(conv(message), separators=(",", ":"), allow_nan=True).encode()
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"".join(buffers)


def decode(data: bytes) -> dict:
    """Parse bytes made by :func:`encode`; anything else raises :class:`ProtocolError`."""
    try:
        message = _decode(bytes(data))
    except ProtocolError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, OverflowError, RecursionError,
            MemoryError) as exc:
        raise ProtocolError(f"malformed message: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a dictionary")
    return message


def _decode(data: bytes):
    if len(data) < 9 or data[:4] != MAGIC:
        raise ProtocolError("not a fedglmm message")
    if data[4] != VERSION:
        raise ProtocolError(f"unsupported message version {data[4]}")
    (hlen,) = struct.unpack("<I", data[5:9])
    if 9 + hlen > len(data):
        raise ProtocolError("message is truncated")
    header = json.loads(data[9: 9 + hlen].decode())
    offset = 9 + hlen
    specs: list[dict] = []

    def collect(obj):
        if isinstance(obj, dict):
            if "__array__" in obj:
                specs.append(obj)
            else:
                for v in obj.values():
                    collect(v)
        elif isinstance(obj, list):
            for v in obj:
                collect(v)

    collect(header)
    arrays = {}
    for spec in specs:
        if not _whole(spec["__array__"]) or not isinstance(spec.get("dtype"), str) \
                or spec["dtype"] not in _DTYPES or not isinstance(spec.get("shape"), list):
            raise ProtocolError("malformed array descriptor")
    for i, spec in enumerate(sorted(specs, key=lambda s: s["__array__"])):
        if spec["__array__"] != i:
            raise ProtocolError("malformed array descriptor")
        shape = spec["shape"]
        if len(shape) > 32 or not all(_whole(k) and k >= 0 for k in shape):
            raise ProtocolError("malformed array shape")
        dtype = np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<")
        count = math.prod(shape)             # Python integers: a huge shape cannot wrap around
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(data):
            raise ProtocolError("message is truncated")
        arrays[i] = np.frombuffer(data, dtype, count, offset).reshape(shape).copy()
        offset += nbytes
    if offset != len(data):
        raise ProtocolError("message has trailing bytes")

    def rebuild(obj):
        if isinstance(obj, dict):
            if "__array__" in obj:
                return arrays[obj["__array__"]]
            return {k: rebuild(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [rebuild(v) for v in obj]
        return obj

    return rebuild(header)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def request(kind: str, **payload) -> dict:
    if kind not in KINDS:
        raise ProtocolError(f"unknown request kind '{kind}'")
    return {"kind": kind, **payload}


# --- masked sums (secure aggregation) -----------------------------------------------------------------
# With secure aggregation a site sends its sums as integers in the ring Z / 2^(64·RING_LIMBS), each plus
# pairwise masks that cancel in the sum over sites (:mod:`fedglmm.site.secagg`); the coordinator adds the
# sites' integers and reads the total back (:mod:`fedglmm.coordinator.secagg`).  The encoding is exact:
# every finite float64 is an integer multiple of 2^-1074 below 2^1024, so value · 2^1074 is an integer of
# at most 2098 bits, and 34 limbs of 64 bits leave 77 bits of headroom for the sum over sites.  The total
# is the exact sum of the sites' values, rounded once to float64 (to within 2 units in the last place).

RING_LIMBS = 34
RING_UNIT = 1074                 # ring integer k stands for k · 2^-1074
NOT_SUMMED = ("modes", "condsd", "dmodes", "dcondsd")  # per-group values: never masked, never summed
_ONE = np.uint64(1)


def to_ring(values) -> np.ndarray:
    """Finite float64 values as ring integers: shape (n, RING_LIMBS), little-endian uint64 limbs."""
    x = np.ascontiguousarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("only finite values have a ring encoding")
    m, e = np.frexp(np.abs(x))                           # |x| = m · 2^e, m in [0.5, 1)
    mant = (m * 2.0 ** 53).astype(np.uint64)             # exact: 53-bit integer
    shift = e.astype(np.int64) - 53 + RING_UNIT          # bit position of the mantissa's lowest bit
    low = shift < 0                                      # subnormals: their low bits are zero
    mant = np.where(low, mant >> np.minimum(-shift, 63).astype(np.uint64), mant)
    shift = np.maximum(shift, 0)
    limb, off = shift // 64, (shift % 64).astype(np.uint64)
    out = np.zeros((len(x), RING_LIMBS), dtype=np.uint64)
    rows = np.arange(len(x))
    out[rows, limb] = mant << off
    carry = np.where(off > 0, mant >> (np.uint64(64) - np.maximum(off, _ONE)), np.uint64(0))
    out[rows, np.minimum(limb + 1, RING_LIMBS - 1)] |= np.where(limb + 1 < RING_LIMBS, carry, np.uint64(0))
    neg = x < 0
    if neg.any():
        out[neg] = ring_neg(out[neg])
    return out


def ring_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) mod 2^(64·RING_LIMBS), limb by limb with the carries."""
    out = np.empty_like(a)
    carry = np.zeros(a.shape[0], dtype=np.uint64)
    for k in range(a.shape[1]):
        s = a[:, k] + b[:, k]
        c1 = s < a[:, k]
        t = s + carry
        out[:, k] = t
        carry = (c1 | (t < s)).astype(np.uint64)
    return out


def ring_neg(a: np.ndarray) -> np.ndarray:
    """−a mod 2^(64·RING_LIMBS) (two's complement)."""
    one = np.zeros_like(a)
    one[:, 0] = 1
    return ring_add(~a, one)


def from_ring(a: np.ndarray) -> np.ndarray:
    """The float64 nearest (within 2 ulp) to each ring integer read as a signed fixed-point number."""
    a = np.asarray(a, dtype=np.uint64)
    neg = (a[:, -1] >> np.uint64(63)).astype(bool)
    mag = a.copy()
    if neg.any():
        mag[neg] = ring_neg(a[neg])
    nonzero = mag != 0
    top = np.where(nonzero.any(axis=1), RING_LIMBS - 1 - np.argmax(nonzero[:, ::-1], axis=1), 0)
    rows = np.arange(len(a))
    value = np.zeros(len(a))
    with np.errstate(over="ignore"):
        for k in (0, 1, 2):
            idx = top - k
            part = np.where(idx >= 0, mag[rows, np.maximum(idx, 0)], np.uint64(0)).astype(np.float64)
            value += np.ldexp(part, 64 * idx - RING_UNIT)
    return np.where(neg, -value, value)


def split_sums(reply: dict) -> tuple[list, np.ndarray, dict]:
    """A reply's summable values (every float, and float array, not under :data:`NOT_SUMMED`) as a layout
    ``[[path, shape or None], ...]`` and one flat vector, and the reply without them."""
    layout, values = [], []

    def walk(obj, path):
        if isinstance(obj, dict):
            rest = {}
            for k, v in obj.items():
                if k in NOT_SUMMED:
                    rest[k] = v
                elif _summable(v):
                    arr = np.asarray(v, dtype=np.float64)
                    scalar = not isinstance(v, np.ndarray)
                    layout.append([path + [k], None if scalar else list(arr.shape)])
                    values.append(arr.ravel())
                else:
                    rest[k] = walk(v, path + [k])
            return rest
        if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
            return [walk(v, path + [i]) for i, v in enumerate(obj)]
        return obj

    rest = walk(reply, [])
    flat = np.concatenate(values) if values else np.zeros(0)
    return layout, flat, rest


def join_sums(layout: list, flat: np.ndarray, rest: dict) -> dict:
    """The inverse of :func:`split_sums`: the values put back at their paths in (a copy of) ``rest``."""
    import copy

    out = copy.deepcopy(rest)
    pos = 0
    for path, shape in layout:
        size = 1 if shape is None else int(math.prod(shape))
        chunk = flat[pos: pos + size]
        pos += size
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = float(chunk[0]) if shape is None else chunk.reshape(shape)
    return out


def _summable(v) -> bool:
    if isinstance(v, np.ndarray):
        return v.dtype.kind == "f"
    return isinstance(v, (float, np.floating)) and not isinstance(v, bool)
