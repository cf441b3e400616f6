"""A site's frame before its design: the columns the model uses must be there, once each, and complete.

lme4 fits the rows that have a value in every column the model uses (R's ``na.omit``); so do we, at each
site, with ``na_action="omit"`` (the default): :func:`complete_rows` drops the other rows and counts them.
``na_action="fail"`` refuses a missing value instead, naming the column and the first row.  A missing
value is pandas' ``NA``/``NaN``/``None`` (an empty cell or ``NA`` in a CSV file); an infinite number is
not missing and is refused, as lme4 refuses it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from .labels import column_kind, row_name
from .options import NA_ACTIONS


def check_na_action(na_action) -> str:
    if na_action not in NA_ACTIONS:
        raise InputError(f"na_action must be 'omit' (drop rows with a missing value, as lme4) or 'fail', "
                         f"not {na_action!r}")
    return na_action


def na_payload(na_action: str) -> dict:
    """What a request carries about missing values: nothing for the default ``omit`` (so a request is the same
    bytes as before there was a choice), ``{"na_action": "fail"}`` otherwise."""
    return {} if na_action == "omit" else {"na_action": na_action}


def check_columns(df: pd.DataFrame, cols: list[str], where: str) -> None:
    """Rows present; the used columns present and unique."""
    if len(df) == 0:
        raise InputError(f"{where}: no rows")
    names = [str(c) for c in df.columns]
    for col in cols:
        if col not in names:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise InputError(f"{where}: column '{col}' not found (columns: {shown})")
        if names.count(col) > 1:
            raise InputError(f"{where}: column '{col}' appears more than once")


def complete_rows(df: pd.DataFrame, cols: list[str], where: str, na_action: str = "omit"
                  ) -> tuple[pd.DataFrame, int]:
    """The rows of ``df`` with a value in each of ``cols``, and how many rows were dropped.

    ``na_action="fail"`` raises instead of dropping.  No row left is an error.  The rows keep their index
    (their lines in the user's file: :func:`fedglmm.model.labels.row_name`)."""
    check_na_action(na_action)
    check_columns(df, cols, where)
    if _clean(df, cols):
        return df, 0
    na = df[list(cols)].isna().to_numpy()
    if not na.any():
        return df, 0
    if na_action == "fail":
        _refuse_missing(df, cols, na, where, hint=True)
    keep = ~na.any(axis=1)
    dropped = int(len(df) - keep.sum())
    if not keep.any():
        lacking = [c for c, k in zip(cols, na.any(axis=0)) if k]
        raise InputError(f"{where}: no rows left after omitting the {dropped} rows with a missing value "
                         f"(in {', '.join(lacking[:6])}{', ...' if len(lacking) > 6 else ''})")
    return df[keep], dropped


def check_frame(df: pd.DataFrame, cols: list[str], where: str) -> None:
    """Rows present; used columns present, unique, complete, and finite if numeric."""
    check_columns(df, cols, where)
    if _clean(df, cols):
        return
    used = df[list(cols)]
    na = used.isna().to_numpy()
    if na.any():
        _refuse_missing(df, cols, na, where)
    num = [c for c in cols if column_kind(df[c].dtype) == "numeric"]
    if num:
        values = used[num].to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise InputError(f"{where}: column '{num[j]}' has non-finite value {values[i, j]:g} in {row_name(df, i)}")


def _clean(df: pd.DataFrame, cols: list[str]) -> bool:
    """Whether none of ``cols`` has a missing value and every float column is finite, looked at column by
    column (a frame of the used columns is a copy: 0.45 ms for 1e4 rows and 7 columns, against 0.1 ms)."""
    for col in cols:
        s = df[col]
        kind = s.dtype.kind if isinstance(s.dtype, np.dtype) else None
        if kind in ("i", "u", "b"):
            continue
        if kind == "f":
            if not np.isfinite(s.to_numpy()).all():
                return False
        elif s.isna().to_numpy().any():
            return False
    return True


def _refuse_missing(df, cols, na, where, hint: bool = False):
    j = int(np.argmax(na.any(axis=0)))
    n = int(na[:, j].sum())
    how = "; drop those rows, or let the fit omit them (na_action='omit', --na-action omit)" if hint else ""
    raise InputError(f"{where}: column '{cols[j]}' has {n} missing value{'s' * (n > 1)} "
                     f"(first in {row_name(df, int(np.argmax(na[:, j])))}){how}")
