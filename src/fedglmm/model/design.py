"""One site's frame -> model matrices: what a site describes of its frame, and its design in the agreed
coding.

The flow: each site calls :func:`describe_frame` on its own frame and sends the (JSON) description; the
coordinator merges all of them into one :class:`~fedglmm.model.spec.Schema`
(:func:`fedglmm.coordinator.schema.merge_schema`); each site then calls :func:`build_design` with that
schema.  Because every categorical column is converted to a ``pd.Categorical`` with the *agreed* levels
before formulaic sees it, every site gets the same columns in the same order, also for levels it does
not have.  How values become labels and how levels are ordered: :mod:`fedglmm.model.labels`.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from . import deferred  # noqa: F401 -- first: formulaic's scipy.sparse.linalg is then loaded on first use
from formulaic import model_matrix
from formulaic.errors import DataMismatchWarning, FormulaicError

from ..errors import InputError
from .families import get_family
from .frame import check_frame
from .formula import _first_line, factor_columns, is_plain_name, variables
from .labels import (as_labels, column_kind, first_non_number, group_codes, level_columns, not_numbers, row_name,
                     sort_levels)
from . import transforms
from .rsyntax import functions
from .spec import NO_GROUP, Design, Grouping, ModelSpec, Schema


MAX_CODES = 10      # a text column with at most this many number-like labels is a factor of codes

# --- 1. describe ----------------------------------------------------------------------------------

def describe_frame(df: pd.DataFrame, spec: ModelSpec, site: str) -> dict:
    """What a site tells the coordinator about its frame (JSON-serialisable; no rows).

    ``{"n", "columns": {name: "numeric"|"categorical"} for all columns, "levels": {column: sorted
    levels} for the categorical columns the model uses, "groups": [group labels present here]}``; with
    several grouping factors ``"groups"`` is ``{factor: [its labels present here]}``.

    A used text column whose values are almost all numbers (at most 5 % of rows and 3 distinct labels are
    not, more than ``MAX_CODES`` distinct labels are) is taken for a numeric column with a typo and
    refused here, at the site, naming the first such value and its row; a factor whose labels look like
    numbers can be marked ``C(column)`` in the formula.  A text column with few number-like labels is a
    factor of codes (mlmRev's birth order '01', '23', '46', '7p'), whatever share of a site's rows its other
    labels hold: the share depends on how the rows are split over sites.
    """
    where = f"site '{site}'"
    check_frame(df, variables(spec), where)
    kinds = {str(c): column_kind(dt) for c, dt in df.dtypes.items()}
    for what, col in (("weights", spec.weights), ("offset", spec.offset_column)):
        if col is not None and kinds.get(col) != "numeric":
            raise InputError(f"{where}: {what} column '{col}' is not numeric{first_non_number(df[col], df)}")
    levels = {}
    marked = set(factor_columns(spec))
    for col in level_columns(spec, kinds):
        labels = as_labels(df[col])
        levels[col] = sort_levels(labels, natural=kinds[col] == "numeric")
        bad = not_numbers(labels)
        if kinds[col] == "categorical" and col not in marked and bad.any() and bad.mean() <= 0.05 \
                and len(set(labels[bad])) <= 3 and len(set(labels[~bad])) > MAX_CODES:
            first = int(np.argmax(bad))
            raise InputError(f"{where}: column '{col}' has non-numeric value '{labels[first]}' in {row_name(df, first)} "
                             f"(the other values are numbers; write C({col}) in the formula if it is a factor)")
    groups = {g: factor_codes(df, spec, g)[1] for g in spec.groups}
    if len(groups) < 2:
        groups = next(iter(groups.values()), [])
    return {"n": int(len(df)), "columns": kinds, "levels": levels, "groups": groups}


def factor_codes(df: pd.DataFrame, spec: ModelSpec, group: str) -> tuple[np.ndarray, list[str]]:
    """:func:`~fedglmm.model.labels.group_codes` of :func:`factor_labels`: each row's code into the site's
    levels of ``group`` in natural order, and those levels.  A factor of one integer column is coded from
    its numbers (the same codes and levels, without a text label per row: 0.1 against 0.8 ms for 1e4 rows)."""
    cols = spec.factor_columns(group)
    values = df[cols[0]].to_numpy() if len(cols) == 1 else None
    if values is not None and values.dtype.kind in "iu":
        codes, uniq = pd.factorize(values, sort=True)
        return codes.astype(np.int64), [str(x) for x in uniq.tolist()]
    return group_codes(factor_labels(df, spec, group))


def factor_labels(df: pd.DataFrame, spec: ModelSpec, group: str) -> np.ndarray:
    """Each row's level of grouping factor ``group``: its columns' labels joined by ``:``."""
    cols = spec.factor_columns(group)
    labels = as_labels(df[cols[0]])
    for col in cols[1:]:
        labels = np.char.add(np.char.add(labels.astype(str), ":"), as_labels(df[col]).astype(str))
    return labels


# --- 2. build -------------------------------------------------------------------------------------

def build_design(spec: ModelSpec, schema: Schema, df: pd.DataFrame, family, site: str,
                 checked: bool = False, specs: dict | None = None) -> Design:
    """One site's :class:`Design`, rows sorted (stably) by group.

    ``group_levels`` are the site's own group labels, numeric order if they are all numbers, else
    string order.  A model without random terms (a GLM) gets ``Z`` of shape (n, 0), ``theta_mask``
    (0, 0), ``group`` all zeros, ``group_levels == ["."]`` and ``group_name`` None, and rows in
    their original order.  ``family.validate`` runs before the reordering, so the rows it names are
    rows of the site's file.  ``checked``: :func:`describe_frame` already checked this frame for this
    formula (missing and non-finite values), so the check is not repeated.  ``specs``, a dict, receives
    formulaic's model spec of X (``"x"``) and of each block of Z (``"z"``), None where built without it.
    """
    fam = get_family(family)
    where = f"site '{site}'"
    parts = _model_parts(spec, schema, df, variables(spec), where, check=not checked, specs=specs)
    y, trials = _outcome(spec, schema, parts.frame, fam, where)
    row = lambda i: row_name(df, i)      # noqa: E731
    fam.validate(y, trials, where=f"at {where}", row=row,
                 proportion=spec.weights is not None and not spec.failures and spec.response not in schema.levels)
    if spec.weights is not None:
        y, trials = _weighted(y, trials, _numeric(spec.weights, parts.frame, where, "weights"), fam, where, row)
    coded = [factor_codes(df, spec, g) for g in spec.groups]
    group, levels = coded[0] if coded else (np.zeros(len(df), dtype=np.int64), [NO_GROUP])
    order = np.argsort(group, kind="stable")
    factors = ()
    if len(coded) > 1:
        ends = np.cumsum([0] + parts.z_widths)
        per_term = [np.arange(a, b) for a, b in zip(ends[:-1], ends[1:])]
        factors = tuple(Grouping(g, codes[order], lv, np.concatenate([c for t, c in zip(spec.random, per_term)
                                                                      if t.group == g]))
                        for g, (codes, lv) in zip(spec.groups, coded))
    return Design(y=y[order], trials=trials[order], offset=parts.offset[order], X=parts.X[order],
                  Z=parts.Z[order], group=group[order], group_levels=levels, x_names=parts.x_names,
                  z_names=parts.z_names, theta_mask=_theta_mask(spec, parts.z_widths), group_name=spec.group,
                  factors=factors, weighted=spec.weights is not None)


def coding_key(spec: ModelSpec, schema: Schema, family) -> tuple | None:
    """All that :func:`build_design` reads besides the rows: two designs of the same rows with equal keys
    are equal (a site's own coding and the agreed one coincide where the site has every level).  None --
    never equal -- for a formula with stateful transforms (their pooled state is not compared)."""
    if schema.transforms:
        return None
    fam = get_family(family)
    cols = tuple((c, schema.kinds.get(c), tuple(schema.levels[c]) if c in schema.levels else None)
                 for c in variables(spec))
    return spec, fam.name, fam.link, cols


def _outcome(spec, schema, frame, fam, where) -> tuple[np.ndarray, np.ndarray]:
    if spec.response in schema.levels:        # a two-level factor: first level 0, second 1
        if fam.name != "binomial":
            raise InputError(f"{where}: outcome '{spec.response}' is not numeric")
        y = frame[spec.response].cat.codes.to_numpy().astype(float)
        return y, np.ones_like(y)
    y = _numeric(spec.response, frame, where, "outcome", schema.transforms)
    trials = y + _numeric(spec.failures, frame, where, "outcome", schema.transforms) if spec.failures \
        else np.ones_like(y)
    return y, trials


def _weighted(y, trials, w, fam, where, row) -> tuple[np.ndarray, np.ndarray]:
    """(y, trials) with prior weights ``w`` (finite, ≥ 0): binomial, a proportion (or a cbind count) of
    trials × w successes -- the cbind form, whole counts kept whole; the other families keep y and carry w
    as ``trials`` (see :class:`~fedglmm.model.spec.Design`)."""
    bad = ~(w >= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{where}: weights must be ≥ 0: found {w[i]:g} in {row(i)}")
    if fam.name != "binomial":
        return y, w
    succ, m = y * w, trials * w
    whole = np.abs(succ - np.round(succ)) <= 1e-9 * np.maximum(1.0, m)
    return np.where(whole, np.round(succ), succ), m


def _theta_mask(spec: ModelSpec, widths: list[int]) -> np.ndarray:
    """Lower-triangular pattern of Λ: a full block per correlated term, a diagonal per uncorrelated one."""
    blocks = [np.tril(np.ones((k, k), bool)) if t.correlated else np.eye(k, dtype=bool)
              for t, k in zip(spec.random, widths)]
    k = sum(b.shape[0] for b in blocks)
    mask, at = np.zeros((k, k), dtype=bool), 0
    for b in blocks:                       # the blocks on the diagonal
        mask[at:at + b.shape[0], at:at + b.shape[0]] = b
        at += b.shape[0]
    return mask


# --- 3. new data ----------------------------------------------------------------------------------

def new_data_matrices(spec: ModelSpec, schema: Schema, df: pd.DataFrame, need_group: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(X, Z, offset, group_labels)`` for prediction on new rows, in their original order.

    No outcome is needed.  Categorical columns get the schema's levels (a level the fit did not see is
    an :class:`InputError`).  ``group_labels`` -- ``{factor: each row's level (text)}`` -- is returned
    when ``need_group`` and the model has random effects; otherwise None (and the grouping columns may be
    absent).
    """
    where = "new data"
    cols = variables(spec, outcome=False, group=False)
    if need_group and spec.group:
        for col in spec.grouping_columns:
            if col not in df.columns:
                raise InputError(f"{where}: grouping column '{col}' not found "
                                 "(needed for group-level predictions)")
        cols += [c for c in spec.grouping_columns if c not in cols]
    parts = _model_parts(spec, schema, df, cols, where)
    labels = {g: factor_labels(df, spec, g).astype(object) for g in spec.groups} \
        if need_group and spec.group else None
    return parts.X, parts.Z, parts.offset, labels


# --- shared: checks, categorical conversion and formulaic -----------------------------------------

@dataclass
class _Parts:
    """What :func:`_model_parts` builds, rows in their original order."""

    frame: pd.DataFrame          # the used columns, categoricals converted
    X: np.ndarray
    x_names: list[str]
    Z: np.ndarray
    z_names: list[str]
    z_widths: list[int]          # columns of Z per random term
    offset: np.ndarray


def _model_parts(spec: ModelSpec, schema: Schema, df: pd.DataFrame, cols: list[str], where: str,
                 check: bool = True, specs: dict | None = None) -> _Parts:
    """Check the frame, convert categoricals to the agreed levels, and build X, Z and the offset (formulaic's
    model specs into ``specs``, see :func:`build_design`)."""
    specs = {} if specs is None else specs
    if check:
        check_frame(df, cols, where)
    frame = _prepare(df, spec, schema, cols, where)
    state = schema.transforms                   # pooled state of center(), scale(), poly(), ... (transforms.py)
    X, x_names = _finite(*_matrix(spec.fixed, frame, where, state, specs, "x"), "fixed-effects column", where, df)
    blocks, specs["z"] = [], []
    for t in spec.random:
        if t.expr.replace(" ", "") == "1":
            blocks.append((np.ones((len(frame), 1)), ["Intercept"]))
            specs["z"].append(None)
        else:
            blocks.append(_matrix(t.expr, frame, where, state, specs["z"]))
    Z = np.hstack([b[0] for b in blocks]) if blocks else np.zeros((len(frame), 0))
    Z, z_names = _finite(Z, [n for b in blocks for n in b[1]], "random-effects column", where, df)
    offs = [_numeric(expr, frame, where, "offset", state) for expr in spec.offsets]
    offset = (_finite(np.column_stack(offs), list(spec.offsets), "offset", where, df)[0].sum(axis=1)
              if offs else np.zeros(len(frame)))
    return _Parts(frame, X, x_names, Z, z_names, [b[0].shape[1] for b in blocks], offset)


def _prepare(df: pd.DataFrame, spec: ModelSpec, schema: Schema, cols: list[str], where: str) -> pd.DataFrame:
    """The used columns, categoricals as ``pd.Categorical`` with the schema's levels (``df`` itself where it
    holds no other column and none is converted: a copy of 1e4 rows and 7 columns takes 0.4 ms)."""
    convert = any(col in schema.levels for col in cols)
    frame = df if not convert and set(map(str, df.columns)) <= set(cols) else df[cols]   # a copy: df left alone
    for col in cols:
        what = "outcome" if col == spec.response else "column"
        if col in schema.levels:
            labels, levels = as_labels(df[col]), schema.levels[col]
            unknown = ~np.isin(labels, np.asarray(levels, dtype=str))
            if unknown.any():
                i = int(np.argmax(unknown))
                raise InputError(f"{where}: {what} '{col}' has level '{labels[i]}' in {row_name(df, i)} that is not "
                                 f"among the model's levels ({', '.join(levels[:10])})")
            frame[col] = pd.Categorical(labels, categories=levels)
        elif schema.kinds.get(col) == "numeric" and column_kind(df[col].dtype) != "numeric":
            raise InputError(f"{where}: {what} '{col}' is not numeric{first_non_number(df[col], df)}")
    return frame


def _matrix(rhs: str, frame: pd.DataFrame, where: str, state: dict | None = None, into=None, key=None
            ) -> tuple[np.ndarray, list[str]]:
    """formulaic's model matrix of a right-hand side, as floats with its column names (its model spec, None
    if built without formulaic, into ``into[key]``, or appended to the list ``into``).

    ``state``: the pooled state of the formula's stateful transforms (:mod:`fedglmm.model.transforms`);
    they are always evaluated with it, never learnt from these rows.  Levels are already validated by
    :func:`_prepare`, so formulaic's DataMismatchWarning is silenced; non-finite values are reported by the
    callers, so numpy's warnings are too.
    """
    plain = _plain_terms(rhs, frame)
    mm = _formulaic(rhs, frame, where, transforms.apply_context(), state) if plain is None else None
    if into is not None and key is None:
        into.append(mm.model_spec if mm is not None else None)
    elif into is not None:
        into[key] = mm.model_spec if mm is not None else None
    return plain if mm is None else (mm.to_numpy(dtype=float), [str(c) for c in mm.columns])


def _formulaic(rhs: str, frame: pd.DataFrame, where: str, context: dict, state: dict | None):
    """formulaic's model matrix (its errors as one line)."""
    from formulaic import Formula, ModelSpec as FormulaicSpec

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", DataMismatchWarning)
            spec = FormulaicSpec(formula=Formula(rhs), transform_state=copy.deepcopy(state)) if state else rhs
            return model_matrix(spec, frame, na_action="ignore", context={**functions(), **context})
    except (FormulaicError, SyntaxError, NameError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise InputError(f"{where}: cannot evaluate '{rhs}': {_first_line(e)}") from None


def transform_statistics(spec: ModelSpec, df: pd.DataFrame, where: str) -> dict:
    """A site's statistics for the pooled state of the formula's stateful transforms (``{call: sums}``,
    :func:`fedglmm.model.transforms.site_statistics`), from its rows ``df`` (complete ones)."""
    frame = df[variables(spec)]
    exprs = [spec.fixed] + [t.expr for t in spec.random if t.expr.replace(" ", "") != "1"]
    exprs += [f"0 + I({e})" for e in (spec.response, spec.failures, *spec.offsets) if e and not is_plain_name(e)]
    context = transforms.collect_context()
    return transforms.site_statistics([_formulaic(e, frame, where, context, None).model_spec.transform_state
                                       for e in exprs])


def _plain_terms(rhs: str, frame: pd.DataFrame):
    """The common case ``1 + a + b`` / ``0 + a + b`` with numeric columns only, built without formulaic
    (same columns and names as formulaic gives: the intercept first, then the terms in order); None
    for anything else."""
    parts = [t.strip() for t in rhs.replace("-1", "+0").replace("- 1", "+0").split("+")]
    terms = [t for t in parts if t not in ("0", "1")]
    if not parts or any(not t for t in parts) or len(set(terms)) != len(terms):
        return None
    if any(t not in frame.columns or column_kind(frame[t].dtype) != "numeric" for t in terms):
        return None
    intercept = "0" not in parts
    cols = [frame[t].to_numpy(dtype=float) for t in terms]
    if intercept:
        cols.insert(0, np.ones(len(frame)))
    names = (["Intercept"] if intercept else []) + terms
    return (np.column_stack(cols) if cols else np.zeros((len(frame), 0))), names


def _numeric(expr: str, frame: pd.DataFrame, where: str, what: str, state: dict | None = None) -> np.ndarray:
    """A numeric expression of the columns (``log(t)``, ``size - incidence``) as a vector."""
    if expr in frame.columns and isinstance(frame[expr].dtype, pd.CategoricalDtype):
        raise InputError(f"{where}: {what} '{expr}' is not numeric")
    if expr in frame.columns and column_kind(frame[expr].dtype) == "numeric":
        return frame[expr].to_numpy(dtype=float)          # a plain column: no formula machinery needed
    values, _ = _matrix(f"0 + I({f'`{expr}`' if is_plain_name(expr) else expr})", frame, where, state)
    if values.shape[1] != 1:
        raise InputError(f"{where}: {what} '{expr}' is not numeric")
    return values[:, 0]


def _finite(M: np.ndarray, names: list[str], what: str, where: str, df: pd.DataFrame):
    bad = ~np.isfinite(M)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise InputError(f"{where}: {what} '{names[j]}' has non-finite value {M[i, j]:g} in {row_name(df, i)}")
    return M, names
