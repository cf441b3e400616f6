"""What a site remembers between fits, for its limits: when fits were set up (``max_fits_per_day``) and
which rows each distinct fit used (the differencing rule of ``min_rows``).

A row set is kept as the sorted keyed hashes of its rows, never a value: each row of the site's frame
(all its columns) is hashed with SipHash-2-4 under a 128-bit key drawn once and kept in the state file
(pandas' ``hash_pandas_object``), and identical rows are told apart by their occurrence number.  Without
the key nobody can test a guessed row against the file.  Identical row sets are stored once.

The file (JSON, written atomically and synced) lives where ``site.toml`` says (``[audit] state``), by
default next to the audit log; a site without either keeps the same record in memory for its lifetime.
Deleting the file resets the limits; the data steward decides when that is right.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class SiteState:
    """The limits' memory: fit times and distinct row sets, in a file or in memory."""

    def __init__(self, path=None):
        self.path = Path(path) if path else None
        self.key = secrets.token_hex(8)                   # 16 characters: pandas' SipHash key
        self.fits: list[str] = []                         # ISO times of fit set-ups (the last two days)
        self.row_sets: list[np.ndarray] = []              # sorted uint64 row hashes, one per distinct set
        if self.path is not None and self.path.exists():
            self._load()
        elif self.path is not None:
            self.save()                                   # fail when the site starts, not at its first fit

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            self.key = str(doc["key"])
            self.fits = [str(t) for t in doc.get("fits", [])]
            self.row_sets = [np.frombuffer(base64.b64decode(r), dtype="<u8").copy() for r in doc.get("row_sets", [])]
            if len(self.key) != 16:
                raise ValueError("bad key")
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise InputError(f"site state '{self.path}' cannot be read ({type(exc).__name__}); delete it to "
                             "reset the site's limits") from None

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"version": 1, "key": self.key, "fits": self.fits,
               "row_sets": [base64.b64encode(r.astype("<u8").tobytes()).decode() for r in self.row_sets]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise InputError(f"cannot write site state '{self.path}': {e.strerror or e}") from None

    # --- fits per day -------------------------------------------------------------------------------
    def fits_today(self, now: datetime | None = None) -> int:
        day = (now or _now()).strftime("%Y-%m-%d")
        return sum(t.startswith(day) for t in self.fits)

    def record_fit(self, now: datetime | None = None) -> None:
        now = now or _now()
        keep = (now - timedelta(days=2)).strftime("%Y-%m-%d")
        self.fits = [t for t in self.fits if t[:10] >= keep] + [now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")]

    # --- row sets -----------------------------------------------------------------------------------
    def row_hashes(self, frame: pd.DataFrame) -> np.ndarray:
        """The sorted keyed hashes of ``frame``'s rows (a multiset made a set by occurrence numbers)."""
        h = np.sort(pd.util.hash_pandas_object(frame, index=False, hash_key=self.key).to_numpy(np.uint64))
        if len(h) == 0:
            return h
        first = np.r_[True, h[1:] != h[:-1]]
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(h)), 0))
        occurrence = (np.arange(len(h)) - run_start).astype(np.uint64)
        with np.errstate(over="ignore"):
            return np.sort(h + occurrence * _MIX)

    def nearest(self, rows: np.ndarray) -> int | None:
        """The fewest rows by which ``rows`` differs from an earlier, different row set (None: no such set)."""
        best = None
        for earlier in self.row_sets:
            diff = len(np.setxor1d(earlier, rows, assume_unique=True))
            if diff and (best is None or diff < best):
                best = diff
        return best

    def remember(self, rows: np.ndarray) -> None:
        if not any(len(r) == len(rows) and np.array_equal(r, rows) for r in self.row_sets):
            self.row_sets.append(np.asarray(rows, np.uint64))
