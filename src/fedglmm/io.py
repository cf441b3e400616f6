"""Reading sites' data files: CSV, gzipped CSV, TSV and Parquet.

:func:`read_table` reads one file into a DataFrame; :func:`load_sites` turns the files given on the
command line into ``{site_id: DataFrame}`` (one file per site, or one file split by a site column).

Every problem is an :class:`~fedglmm.errors.InputError` whose one-line message names the file.
Column types are pandas' own inference (as R's ``read.csv``: text that is all numbers becomes numbers,
other text stays text); nothing is turned into a categorical here.

A frame read from a file remembers where its rows came from, so that an error names the file and the
line an editor shows: its index holds each row's line number in the file (named ``line``; for Parquet
the row number, named ``row``) and ``frame.attrs["fedglmm.source"]`` the file's name
(:func:`fedglmm.model.labels.row_name`).  Selecting rows keeps both.

Large files: an uncompressed UTF-8 text file above :data:`ARROW_BYTES` without quote characters or blank
lines (so that record k is line k + 1) is parsed by pyarrow's multi-threaded reader when pyarrow is
installed, with pandas' missing-value and boolean spellings and dates kept as text: the frame pandas
would give, in a fraction of the time; any other file, and anything pyarrow cannot read, goes to pandas.
``columns`` (the formula's variables, see :func:`used_columns`) reads only those columns of a Parquet or
text file that has them all (otherwise the whole file, so that a message about a missing column can list
the others).
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import os
import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .model.labels import SOURCE_ATTR

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
ARROW_BYTES = 16 * 2**20     # text files larger than this are parsed by pyarrow (when installed and plain)
# pandas' default missing-value spellings (``pandas.read_csv``'s ``na_values``), for pyarrow's reader
_NA = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
       "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


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


def check_sep(sep: str | None) -> str | None:
    """The separator as pandas wants it: one character; ``\\t`` or ``tab`` for a tab.  None: by file type."""
    if sep is None:
        return None
    sep = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(sep, sep)
    if len(sep) != 1 or sep in "\"\r\n":
        raise InputError(f"the separator must be one character (e.g. ';' or '\\t'), not {sep!r}")
    return sep


def check_encoding(encoding: str | None) -> str | None:
    """A text encoding Python knows (``latin-1``, ``cp1252``, ``utf-8``, ...); None: UTF-8."""
    if encoding is None:
        return None
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise InputError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    return encoding


def read_table(path, sep: str | None = None, encoding: str | None = None, columns=None) -> pd.DataFrame:
    """Read a CSV (``.csv``, ``.csv.gz``), TSV (``.tsv``, ``.tsv.gz``) or Parquet (``.parquet``, ``.pq``) file
    (only ``columns``, if given and all present).

    ``sep``: the field separator of a text file (default: ``,`` for CSV, a tab for TSV); ``encoding``: its
    text encoding (default UTF-8; e.g. ``latin-1``).  The index holds each row's line number in the file
    (see the module docstring).  Raises :class:`InputError` for a missing, empty, unreadable or garbled
    file, an unknown file type, duplicated column names, or Parquet without pyarrow.
    """
    shown = str(path)
    p = Path(path)
    fmt = file_format(p)
    sep, encoding = check_sep(sep), check_encoding(encoding)
    if not p.exists():
        raise InputError(f"file '{shown}' not found")
    if p.is_dir():
        raise InputError(f"'{shown}' is a folder, not a data file")
    if not os.access(p, os.R_OK):
        raise InputError(f"cannot read file '{shown}': permission denied")
    if p.stat().st_size == 0:
        raise InputError(f"file '{shown}' is empty")
    delim = sep or ("\t" if fmt == "tsv" else ",")
    try:
        if fmt == "parquet":
            df = _read_parquet(p, shown, columns)
            lines = None
        else:
            df, lines = _read_text(p, delim, encoding, shown, columns)
    except InputError:
        raise
    except pd.errors.EmptyDataError:
        raise InputError(f"file '{shown}' is empty") from None
    except Exception as e:   # ParserError, UnicodeDecodeError, BadGzipFile, pyarrow's ArrowInvalid, OSError, ...
        raise InputError(f"cannot read file '{shown}': {_reason(e, encoding)}") from None
    if df.shape[1] == 0:
        raise InputError(f"file '{shown}' is empty (no columns)")
    if df.shape[0] == 0:
        raise InputError(f"file '{shown}' is empty (a header but no rows)")
    if fmt != "parquet" and df.shape[1] == 1 and sep is None:
        other = next((c for c in (";", "\t", ",", "|") if c in str(df.columns[0])), None)
        if other is not None and other != delim:
            name = "a tab" if other == "\t" else f"'{other}'"
            flag = "'\\t'" if other == "\t" else f"'{other}'"
            raise InputError(f"file '{shown}' has a single column '{df.columns[0]}': is it separated by "
                             f"{name} rather than {'a tab' if fmt == 'tsv' else 'a comma'}? (give --sep {flag})")
    df.columns = [str(c) for c in df.columns]
    _check_unique(list(df.columns), shown)
    if lines is not None and len(lines) == len(df):
        df.index = pd.Index(lines, name="line")
    elif fmt == "parquet":
        df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    else:                     # a layout the line scan does not follow: the header is line 1, no blank lines
        df.index = pd.RangeIndex(2, len(df) + 2, name="line")
    df.attrs[SOURCE_ATTR] = shown
    return df


def _read_text(p: Path, delim: str, encoding: str | None, shown: str, columns):
    """(frame, each record's line or None: record k on line k + 1) of a delimited text file."""
    df = _read_arrow(p, delim, encoding, shown, columns)
    if df is not None:
        return df, None
    text = _text(p, encoding)
    if columns is not None:
        header = [str(c) for c in pd.read_csv(io.StringIO(text), sep=delim, nrows=0).columns]
        columns = [c for c in header if c in set(columns)] if set(columns) <= set(header) else None
    df = pd.read_csv(io.StringIO(text), sep=delim, low_memory=False, usecols=columns)
    lines = _record_lines(text, delim) if len(df) else None
    _check_header(text, delim, shown)
    return df, lines


def _plain(p: Path) -> bool:
    """A file whose record k is on line k + 1: no quote character, no blank line, no byte-order mark."""
    tail, size = b"\n", 1 << 26
    with open(p, "rb") as fh:
        first = fh.read(4)
        if not first or first.startswith(b"\xef\xbb\xbf") or first[:1] in (b"\n", b"\r", b" ", b"\t"):
            return False
        fh.seek(0)
        while chunk := fh.read(size):
            block = tail + chunk
            if len(chunk) < size:              # the end: blank lines after the last record do not count
                block = block.rstrip(b" \t\r\n")
            if b'"' in chunk or _BLANK_LINE.search(block) is not None:
                return False
            tail = block[-64:]
    return True


def _read_arrow(p: Path, delim: str, encoding: str | None, shown: str, columns) -> pd.DataFrame | None:
    """pyarrow's multi-threaded reader for a large plain text file (see the module docstring), or None."""
    if p.stat().st_size <= ARROW_BYTES or p.name.lower().endswith(".gz") or \
            (encoding or "utf-8").lower().replace("_", "-") not in ("utf-8", "utf8") or not _plain(p):
        return None
    try:
        import pyarrow as pa
        from pyarrow import csv as pacsv
    except ImportError:
        return None
    try:
        names = _arrow_header(p, delim)
        _check_unique(names, shown)
        keep = [c for c in names if c in set(columns)] if columns is not None and set(columns) <= set(names) \
            else None
        bools = {"true_values": ["True", "TRUE", "true"], "false_values": ["False", "FALSE", "false"]}
        types: dict = {}
        for _ in range(2):
            convert = pacsv.ConvertOptions(null_values=_NA, strings_can_be_null=True, include_columns=keep,
                                           column_types=types, **bools)
            table = pacsv.read_csv(p, parse_options=pacsv.ParseOptions(delimiter=delim), convert_options=convert)
            # pandas keeps dates and times as text: read those columns again as text
            temporal = {f.name: pa.string() for f in table.schema if pa.types.is_temporal(f.type)}
            if not temporal or types:
                break
            types = temporal
        return table.to_pandas()
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError):
        return None


def _arrow_header(p: Path, delim: str) -> list[str]:
    with open(p, encoding="utf-8") as fh:
        first = fh.readline().rstrip("\r\n")
    return [n.strip() for n in next(csv.reader([first], delimiter=delim), [])]


def _text(p: Path, encoding: str | None) -> str:
    """The file's text (gunzipped), decoded; a UTF-8 byte-order mark is dropped, as pandas does."""
    raw = gzip.open(p).read() if p.name.lower().endswith(".gz") else p.read_bytes()
    text = raw.decode(encoding or "utf-8")
    return text[1:] if text.startswith("\ufeff") else text


def _check_header(text: str, delim: str, shown: str) -> None:
    """pandas renames a repeated column name silently (x, x.1): refuse it, naming the names."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    names = next(csv.reader([first], delimiter=delim), [])
    _check_unique([n.strip() for n in names], shown)


def _check_unique(names: list[str], shown: str) -> None:
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        listed = ", ".join(f"'{n}'" for n in dup[:5])
        raise InputError(f"file '{shown}': column name{'s' if len(dup) > 1 else ''} {listed} "
                         f"appear{'' if len(dup) > 1 else 's'} more than once in the header; give each column "
                         "its own name")


def _record_lines(text: str, delim: str) -> np.ndarray | None:
    """The line (1-based, as an editor counts) on which each data record of a delimited text starts.

    Blank lines are skipped, as pandas skips them; a quoted field may span lines.  None if the scan and
    pandas could disagree (the caller then counts from line 2)."""
    if '"' not in text:
        stripped = np.array([bool(line.strip()) for line in text.split("\n")])
        starts = np.flatnonzero(stripped) + 1
        return starts[1:]
    starts, line = [], 1
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        for record in reader:
            if record and not (len(record) == 1 and not record[0].strip()):
                starts.append(line)
            line = reader.line_num + 1
    except csv.Error:
        return None
    return np.asarray(starts[1:], dtype=np.int64)


def _read_parquet(p: Path, shown: str, columns=None) -> pd.DataFrame:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(PARQUET_HINT) from None
    names = list(pq.read_schema(p).names)
    _check_unique(names, shown)
    if columns is not None and set(columns) <= set(names):     # the file's order, as for text files
        return pd.read_parquet(p, engine="pyarrow", columns=[c for c in names if c in set(columns)])
    df = pd.read_parquet(p, engine="pyarrow")
    # a frame saved with a named index (``df.set_index("id").to_parquet``): keep it as columns;
    # an unnamed index (row numbers) is dropped, as CSV files written with index=False have none
    named = any(name is not None for name in df.index.names)
    return df.reset_index(drop=not named)


def _reason(e: BaseException, encoding: str | None = None) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, UnicodeDecodeError):
        text = (f"it is not {encoding or 'UTF-8'} text (byte 0x{e.object[e.start]:02x} cannot be decoded): a binary "
                "file, or text in another encoding (give it, e.g. --encoding latin-1)")
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


def used_columns(formula: str, *extra: str | None) -> list[str] | None:
    """The columns a fit of ``formula`` reads, and the ``extra`` ones named (the site column, ...; None is
    skipped); None if the formula does not parse (the whole file is read, and the fit reports it)."""
    from .model.formula import parse_formula, variables

    try:
        cols = variables(parse_formula(formula))
    except InputError:
        return None
    return list(dict.fromkeys(cols + [c for c in extra if c is not None]))


def _header(p, sep, encoding) -> list[str]:
    """A file's column names (empty if it cannot be read: the read itself reports that)."""
    try:
        if file_format(p) == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(p).names)
        delim = check_sep(sep) or ("\t" if file_format(p) == "tsv" else ",")
        return [str(c) for c in pd.read_csv(p, sep=delim, nrows=0, encoding=encoding).columns]
    except Exception:         # noqa: BLE001 - any unreadable file is reported by read_table
        return []


def load_sites(paths, site_column: str | None = None, sep: str | None = None,
               encoding: str | None = None, columns=None) -> dict[str, pd.DataFrame]:
    """Read the data of every site: ``{site_id: DataFrame}`` (only ``columns``, if given, where the files
    have them all).

    * several files: each file is one site, named by its file stem (``data/north.csv`` → ``north``);
      equal stems are told apart by their folder (``a/x``, ``b/x``), then by an index (``x#1``, ``x#2``);
    * one file and ``site_column``: the file's rows are split by that column
      (:func:`fedglmm.api.split_sites`), one site per value;
    * one file alone: a single site.

    Several files together with a site column are refused (ambiguous: give one or the other).
    ``sep`` and ``encoding`` apply to every text file (see :func:`read_table`).
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
    if columns is not None and len(paths) > 1 and len({frozenset(_header(p, sep, encoding)) for p in paths}) > 1:
        columns = None          # files whose columns differ: read whole, so the fit can say which differ
    if site_column is not None:
        from .api import split_sites

        df = read_table(paths[0], sep, encoding, columns)
        try:
            return split_sites(df, site_column)
        except InputError as e:
            raise InputError(f"file '{paths[0]}': {e}") from None
    return {sid: read_table(p, sep, encoding, columns) for sid, p in zip(site_ids(paths), paths)}
