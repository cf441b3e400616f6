"""Labels and levels: how values of a column become text labels, and how labels are ordered.

Categorical values and group labels are compared as text (``str(value)``; a whole float such as ``3.0``
becomes ``"3"``).  Levels of a categorical column are sorted as plain strings (like R's ``factor`` on
text); levels of a numeric column used as ``C(x)`` and group labels are sorted numerically when all of
them are numbers, else as strings.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .formula import factor_columns, variables
from .spec import ModelSpec

SOURCE_ATTR = "fedglmm.source"   # frame.attrs key: the file a frame was read from (fedglmm.io.read_table)


def row_name(df: pd.DataFrame, i: int) -> str:
    """How a message names the ``i``-th row (0-based position) of a site's frame.

    A frame read by :func:`fedglmm.io.read_table` keeps each row's line in the file as its index (named
    ``line``; ``row`` for Parquet) and the file in ``attrs``: ``line 7 of 'A.csv'``.  An index named
    ``row`` without a file holds row numbers (:func:`number_rows`): ``row 5``.  Any other frame is counted
    as it is: ``row 5`` for its 5th row.
    """
    name = df.index.name
    source = df.attrs.get(SOURCE_ATTR)
    if name in ("line", "row"):
        label = df.index[i]
        return f"{name} {label} of '{source}'" if source else f"row {label}"
    return f"row {i + 1}"


def number_rows(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its rows numbered 1..n (an index named ``row``), unless it already knows its lines in a
    file: selecting rows (dropping incomplete ones, splitting by site) then keeps the numbers the user sees."""
    if df.index.name in ("line", "row") and (df.attrs.get(SOURCE_ATTR) or df.index.is_unique):
        return df
    return df.set_axis(pd.RangeIndex(1, len(df) + 1, name="row"), axis=0)


def column_kind(dt) -> str:
    """``"numeric"`` for int and float dtypes, ``"categorical"`` for anything else (text, category, bool)."""
    numeric = pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt)
    return "numeric" if numeric else "categorical"


def as_labels(s: pd.Series) -> np.ndarray:
    """Values as text; whole floats without '.0' (3.0 -> '3')."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = as_labels(pd.Series(s.cat.categories))
        return cats[s.cat.codes.to_numpy()]
    if isinstance(s.dtype, np.dtype) and s.dtype.kind in "iu":
        # each distinct value is written once (a million rows hold a few thousand groups)
        codes, uniq = pd.factorize(s.to_numpy())
        return np.array([str(x) for x in uniq.tolist()] or [""], dtype=str)[codes]
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype(str).to_numpy(dtype=str)
    if column_kind(s.dtype) == "numeric":
        codes, uniq = pd.factorize(s.to_numpy(dtype=float), use_na_sentinel=False)
        v = np.asarray(uniq, dtype=float)
        whole = np.isfinite(v) & (v == np.round(v)) & (np.abs(v) < 2.0 ** 53)
        return np.where(whole, np.where(whole, v, 0).astype(np.int64).astype(str), v.astype(str))[codes]
    return s.astype(str).to_numpy(dtype=str)


def not_numbers(labels: np.ndarray) -> np.ndarray:
    """True where a text label does not read as a number."""
    return pd.to_numeric(pd.Series(labels, dtype=object), errors="coerce").isna().to_numpy()


def natural_order(labels: np.ndarray) -> np.ndarray:
    """Argsort: numerically if every label is a number, else as strings."""
    numbers = pd.to_numeric(pd.Series(labels, dtype=object), errors="coerce").to_numpy(dtype=float)
    key = numbers if len(labels) and not np.isnan(numbers).any() else np.asarray(labels, dtype=str)
    return np.argsort(key, kind="stable")


def sort_levels(labels, natural: bool) -> list[str]:
    uniq = np.sort(np.asarray(pd.unique(np.asarray(labels, dtype=object)), dtype=str))
    return (uniq[natural_order(uniq)] if natural else uniq).tolist()


def level_columns(spec: ModelSpec, kinds: dict[str, str]) -> list[str]:
    """Used columns that need agreed levels: categorical ones and those inside ``C()``.

    The grouping column counts only if the model also uses it as a predictor.
    """
    factors = set(factor_columns(spec))
    cols = variables(spec, group=False)
    return [c for c in cols if kinds.get(c) == "categorical" or c in factors]


def first_non_number(s: pd.Series, df: pd.DataFrame | None = None) -> str:
    """`` (value 'abc' in row 5)`` for the first value of ``s`` that is not a number, else ''; the row as
    :func:`row_name` names it in ``df`` (the frame ``s`` is a column of)."""
    labels = as_labels(s)
    bad = not_numbers(labels)
    i = int(np.argmax(bad))
    where = row_name(df, i) if df is not None else f"row {i + 1}"
    return f" (value '{labels[i]}' in {where})" if bad.any() else ""


def group_codes(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes 0..G-1 into the site's own labels in natural order."""
    codes, uniq = pd.factorize(labels)               # hashing: much faster than sorting n strings
    uniq = np.asarray(uniq, dtype=str)
    plain = np.argsort(uniq, kind="stable")
    order = plain[natural_order(uniq[plain])]
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq))
    return rank[codes], uniq[order].tolist()
