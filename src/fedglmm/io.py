"""Reading sites' data files: CSV, gzipped CSV, TSV and Parquet.

:func:`read_table` reads one file into a DataFrame; :func:`load_sites` turns the files given on the
command line into ``{site_id: DataFrame}`` (one file per site, or one file split by a site column).

Every problem is an :class:`~fedglmm.errors.InputError` whose one-line message names the file.
Column types are pandas' own inference (as R's ``read.csv``: text that is all numbers becomes numbers,
other text stays text); nothing is turned into a categorical here.
"""
from __future__ import annotations

import gzip
import os
import zlib
from collections import Counter
from pathlib import Path

import pandas as pd

from .errors import InputError

#: file-name endings we read, longest first, and the reader for each
_FORMATS = (
    (".csv.gz", "csv"),
    (".tsv.gz", "tsv"),
    (".csv", "csv"),
    (".tsv", "tsv"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
)
PARQUET_HINT = "reading Parquet needs pyarrow: pip install 'fedglmm[parquet]'"


def file_format(path) -> str:
    """``"csv"``, ``"tsv"`` or ``"parquet"`` from the file name; :class:`InputError` otherwise."""
    name = Path(path).name.lower()
    for ending, fmt in _FORMATS:
        if name.endswith(ending) and len(name) > len(ending):
            return fmt
    known = ", ".join(e for e, _ in _FORMATS)
    suffix = "".join(Path(path).suffixes[-2:]) or "none"
    raise InputError(f"file '{path}': unknown file type ({suffix}); use one of {known}")


def site_stem(path) -> str:
    """The file name without its data ending: ``north.csv.gz`` → ``north``."""
    name = Path(path).name
    low = name.lower()
    for ending, _ in _FORMATS:
        if low.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return Path(path).stem


def read_table(path) -> pd.DataFrame:
    """Read a CSV (``.csv``, ``.csv.gz``), TSV (``.tsv``, ``.tsv.gz``) or Parquet (``.parquet``, ``.pq``) file.

    Raises :class:`InputError` for a missing, empty, unreadable or garbled file, an unknown file type,
    or Parquet without pyarrow.
    """
    shown = str(path)
    p = Path(path)
    fmt = file_format(p)
    if not p.exists():
        raise InputError(f"file '{shown}' not found")
    if p.is_dir():
        raise InputError(f"'{shown}' is a folder, not a data file")
    if not os.access(p, os.R_OK):
        raise InputError(f"cannot read file '{shown}': permission denied")
    if p.stat().st_size == 0:
        raise InputError(f"file '{shown}' is empty")
    try:
        if fmt == "parquet":
            df = _read_parquet(p)
        else:
            df = pd.read_csv(p, sep="\t" if fmt == "tsv" else ",", low_memory=False)
    except InputError:
        raise
    except pd.errors.EmptyDataError:
        raise InputError(f"file '{shown}' is empty") from None
    except Exception as e:   # ParserError, UnicodeDecodeError, BadGzipFile, pyarrow's ArrowInvalid, OSError, ...
        raise InputError(f"cannot read file '{shown}': {_reason(e)}") from None
    if df.shape[1] == 0:
        raise InputError(f"file '{shown}' is empty (no columns)")
    if df.shape[0] == 0:
        raise InputError(f"file '{shown}' is empty (a header but no rows)")
    if fmt != "parquet" and df.shape[1] == 1:
        other = next((c for c in (";", "\t", ",", "|") if c in str(df.columns[0])), None)
        if other is not None and other != ("\t" if fmt == "tsv" else ","):
            name = "a tab" if other == "\t" else f"'{other}'"
            raise InputError(f"file '{shown}' has a single column '{df.columns[0]}': is it separated by "
                             f"{name} rather than {'a tab' if fmt == 'tsv' else 'a comma'}?")
    df.columns = [str(c) for c in df.columns]
    return df


def _read_parquet(p: Path) -> pd.DataFrame:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError(PARQUET_HINT) from None
    df = pd.read_parquet(p, engine="pyarrow")
    # a frame saved with a named index (``df.set_index("id").to_parquet``): keep it as columns;
    # an unnamed index (row numbers) is dropped, as CSV files written with index=False have none
    named = any(name is not None for name in df.index.names)
    return df.reset_index(drop=not named)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, UnicodeDecodeError):
        text = "it is not text (a binary or wrongly encoded file)"
    elif isinstance(e, (gzip.BadGzipFile, zlib.error)):
        text = f"it is not a valid gzip file ({text})"
    return text[:300]


def site_ids(paths) -> list[str]:
    """Site ids for files, one per file: the stems, made unique by the parent folder, then an index."""
    paths = [Path(p) for p in paths]
    ids = [site_stem(p) for p in paths]
    counts = Counter(ids)
    ids = [f"{p.parent.name}/{s}" if counts[s] > 1 and p.parent.name else s for p, s in zip(paths, ids)]
    counts = Counter(ids)
    seen: Counter = Counter()
    out = []
    for s in ids:
        if counts[s] > 1:
            seen[s] += 1
            out.append(f"{s}#{seen[s]}")
        else:
            out.append(s)
    return out


def load_sites(paths, site_column: str | None = None) -> dict[str, pd.DataFrame]:
    """Read the data of every site: ``{site_id: DataFrame}``.

    * several files: each file is one site, named by its file stem (``data/north.csv`` → ``north``);
      equal stems are told apart by their folder (``a/x``, ``b/x``), then by an index (``x#1``, ``x#2``);
    * one file and ``site_column``: the file's rows are split by that column
      (:func:`fedglmm.api.split_sites`), one site per value;
    * one file alone: a single site.

    Several files together with a site column are refused (ambiguous: give one or the other).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise InputError("no data files given")
    if site_column is not None and len(paths) > 1:
        raise InputError(f"a site column ('{site_column}') splits one file into sites, but {len(paths)} files "
                         "were given and each file is already a site: give one file or no site column")
    for p in paths:                      # unknown types are reported before any file is read
        file_format(p)
    seen: dict = {}
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            raise InputError(f"file '{p}' is given twice (also as '{seen[key]}')")
        seen[key] = p
    if site_column is not None:
        from .api import split_sites

        df = read_table(paths[0])
        try:
            return split_sites(df, site_column)
        except InputError as e:
            raise InputError(f"file '{paths[0]}': {e}") from None
    return {sid: read_table(p) for sid, p in zip(site_ids(paths), paths)}
