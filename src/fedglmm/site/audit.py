"""A site's append-only audit log: one JSON line per request it answered.

Each line records what left the site, never a value of it::

    {"time": "2024-05-01T12:00:00.123456Z", "site": "A", "kind": "setup",
     "request_bytes": 812, "request_sha256": "…",
     "sent": [{"name": "colsum", "shape": [7], "dtype": "float64"}, …],
     "reply_bytes": 2143, "reply_sha256": "…"}

or, for a request the site did not answer, ``"refused": "<the one-line reason>"`` in place of
``sent`` (``reply_bytes`` and ``reply_sha256`` are still those of the refusal that left).  Names, shapes,
dtypes, sizes and SHA-256 hashes of the exact bytes only: a data steward can check a reply kept by the
coordinator against its hash, and nothing of a row is written here.  Lines are appended (the file is
opened in append mode, each line flushed and synced to disk) and never rewritten.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import InputError


def describe_fields(obj, prefix: str = "") -> list[dict]:
    """``{name, shape, dtype}`` for each field of a reply; dictionaries and lists of dictionaries are
    described field by field (``sums.xtx``, ``points[0].grad``), other values by their shape and type."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += describe_fields(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out += describe_fields(v, f"{prefix}[{i}]")
        return out
    return [{"name": prefix, **_shape_dtype(obj)}]


def _shape_dtype(v) -> dict:
    if isinstance(v, np.ndarray):
        return {"shape": list(v.shape), "dtype": v.dtype.name}
    if isinstance(v, (list, tuple)):
        return {"shape": [len(v)], "dtype": "list"}
    if isinstance(v, (bool, np.bool_)):
        return {"shape": [], "dtype": "bool"}
    if isinstance(v, (int, np.integer)):
        return {"shape": [], "dtype": "int"}
    if isinstance(v, (float, np.floating)):
        return {"shape": [], "dtype": "float"}
    if isinstance(v, str):
        return {"shape": [], "dtype": "str"}
    if v is None:
        return {"shape": [], "dtype": "null"}
    return {"shape": [], "dtype": type(v).__name__}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AuditLog:
    """Appends one line per answered request to a JSON-lines file."""

    def __init__(self, path):
        self.path = Path(path)
        try:                                       # fail when the site starts, not at its first reply
            with open(self.path, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise InputError(f"cannot open audit log '{self.path}': {e.strerror or e}") from None

    def record(self, site: str, kind, request: bytes, reply: bytes, reply_message: dict) -> dict:
        """Write the line for one request and its reply (``reply_message`` is ``reply`` decoded)."""
        entry = {"time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "site": site,
                 "kind": kind if isinstance(kind, str) else None,
                 "request_bytes": len(request), "request_sha256": sha256(request)}
        if "error" in reply_message:
            entry["refused"] = " ".join(str(reply_message["error"]).split())
        else:
            entry["sent"] = describe_fields(reply_message)
        entry["reply_bytes"] = len(reply)
        entry["reply_sha256"] = sha256(reply)
        self.append(entry)
        return entry

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def read_log(path) -> list[dict]:
    """The entries of an audit log; a line that is not a JSON object is an error naming its number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read audit log '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"audit log '{path}' is not UTF-8 text") from None
    entries = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"audit log '{path}' line {i} is not valid JSON: {e.msg}") from None
        if not isinstance(entry, dict):
            raise InputError(f"audit log '{path}' line {i} is not a JSON object")
        entries.append(entry)
    return entries
