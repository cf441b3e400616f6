"""The messages that cross the site boundary, and their serialisation.

Every request from the coordinator and every reply from a site is a plain dictionary of strings,
numbers, lists, dictionaries and numpy arrays, turned into bytes here and back again, even when both
ends live in one process.  What would cross a network is therefore exactly what the tests see and what
the fit counts.  The format is a small, self-describing, pickle-free container:

    b"FGLM" | version (1 byte) | header length (4 bytes, little endian) | JSON header | array buffers

The header is the message with each array replaced by ``{"__array__": i, "dtype": ..., "shape": ...}``;
buffer i follows in order, little-endian, C-contiguous.  Only float64, int64, uint64 (masked sums) and bool arrays are allowed.

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
  θ-derivatives), as ``{"points": [...]}``;
* ``finalize`` {point, transform, zscale, ...}: the same sums at the final estimate, and each group's
  conditional modes and conditional standard deviations (a site with rules sends them only for groups
  of at least its ``min_group`` and lists the others under ``withheld``);
* ``oneshot`` {formula, family, link, order[, transforms]}: the site's whole one-shot message (its description, set-up
  sums and per-group summaries, see :func:`fedglmm.site.summaries.summarize`), or its refusal to send
  per-group summaries for groups below its minimum size;
* ``inspect`` {what, point, transform, zscale, beta_internal, sigma, seed, ...} (after a fit): for each
  item of ``what`` an aggregate at the fitted point -- ``fingerprint``: the row count and a keyed digest
  of the rows and response values the model uses (so fits of the same data can be recognised without
  sending data); ``residuals``: the binned residual aggregates of :mod:`fedglmm.site.diagnostics`;
  ``posterior``: each group's posterior means and SDs of its random effects (adaptive quadrature), with
  the same withholding as the conditional modes.  Sizes depend on the number of bins, groups and
  parameters, never on the number of rows.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

MAGIC = b"FGLM"
VERSION = 1
_DTYPES = {"float64": np.float64, "int64": np.int64, "uint64": np.uint64, "bool": np.bool_}
KINDS = ("describe", "setup", "evaluate", "finalize", "oneshot", "inspect")


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
