"""A site's design in its own coding, read off its one-shot design instead of built again.

A site's one-shot summaries code each factor against a reference level no row has (every level the site
has is a column: :mod:`fedglmm.site.summaries`); its own fit codes each factor against its own first
level (:mod:`fedglmm.site.own_fit`).  The two designs have the same rows, outcome, offset, Z and groups;
their fixed-effects columns differ only by the first column of every factor's encoding.  With treatment
contrasts, formulaic encodes a factor of levels ``[R, L1, ..., Lk]`` (R the one-shot reference) as the
columns of L1..Lk where it is reduced and of R, L1..Lk where it is not, and the own coding ``[L1, ...,
Lk]`` as those of L2..Lk, or L1..Lk: in both cases the one-shot columns less the first, under the same
names.  Which factors of a term are reduced depends on the formula alone, and a term's columns are the
products of its factors' columns, the first factor varying fastest.  So the own design's X is the
one-shot X less every column that takes the first column of one of its factors (:func:`own_columns`).

Only where all of that can be read from formulaic's model spec: treatment contrasts against the first
level (the one-shot reference) for every factor, one scoped term per term, at most one numeric factor of
unknown width per term, and a Z that no factor enters; otherwise None, and the own design is built as
before.  ``tests/test_recode.py`` checks the columns against formulaic's own-coding build.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .spec import Design

_UNSET = "UNSET"


def own_columns(x_spec, width: int, z_specs: list, sentinel: str) -> np.ndarray | None:
    """Which of the ``width`` columns of the one-shot X the own coding keeps, from formulaic's model spec
    of X (None: X was built without formulaic, from numeric columns only) and of each block of Z (None:
    a block of ones); None if that cannot be read off, or if a factor enters Z."""
    if any(z is not None and not _all(_block_columns(z, sentinel)) for z in z_specs):
        return None
    if x_spec is None:
        return np.ones(width, dtype=bool)
    keep = _block_columns(x_spec, sentinel)
    return keep if keep is not None and len(keep) == width else None


def _all(mask) -> bool:
    return mask is not None and bool(np.all(mask))


def _block_columns(spec, sentinel: str) -> np.ndarray | None:
    """The keep mask of one formulaic model matrix, or None."""
    out = []
    for structure in spec.structure:
        scoped_terms = structure.scoped_terms
        shapes = [_widths(t.factors, spec.encoder_state, sentinel) for t in scoped_terms]
        if any(w is None for w in shapes):
            return None
        ncols = len(structure.columns)
        if len(shapes) == 1 and shapes[0].count(None) == 1:      # one numeric factor: its width is the rest
            known = int(np.prod([w for w in shapes[0] if w is not None]))
            if known == 0 or ncols % known:
                return None
            shapes[0] = [ncols // known if w is None else w for w in shapes[0]]
        if any(None in w for w in shapes) or sum(int(np.prod(w)) for w in shapes) != ncols:
            return None
        for widths, scoped in zip(shapes, scoped_terms):
            index, stride = np.arange(int(np.prod(widths))), 1
            keep = np.ones(len(index), dtype=bool)
            for w, f in zip(widths, scoped.factors):         # the first factor varies fastest
                if _is(spec.encoder_state, f, "categorical"):
                    keep &= (index // stride) % w != 0
                stride *= w
            out.append(keep)
    return np.concatenate(out) if out else np.ones(0, dtype=bool)


def _is(state, scoped, kind: str) -> bool:
    return getattr(state.get(scoped.factor.expr, (None,))[0], "value", None) == kind


def _widths(factors, state, sentinel: str) -> list | None:
    """Each factor's number of columns in a scoped term (None for a numeric factor's, unknown), or None
    where a factor is neither numeric nor coded by treatment contrasts against ``sentinel``; a numeric
    factor beside another numeric one counts as None (unknown) too."""
    widths = []
    for f in factors:
        if _is(state, f, "categorical"):
            levels = _treatment_levels(state[f.factor.expr][1])
            if levels is None or levels[0] != sentinel:
                return None
            widths.append(len(levels) - (1 if f.reduced else 0))
        elif _is(state, f, "numerical"):
            widths.append(None)
        else:
            return None
    return widths


def _treatment_levels(state) -> list | None:
    """The levels of a factor coded by treatment contrasts against its first level, else None."""
    contrasts = (state or {}).get("contrasts")
    kind = getattr(contrasts, "contrasts", None)
    if type(kind).__name__ != "TreatmentContrasts" or str(getattr(kind, "base", None)).split(".")[-1] != _UNSET:
        return None
    levels = list(getattr(contrasts, "levels", None) or ())
    return levels or None


def own_design(d: Design, specs: dict, sentinel: str) -> Design | None:
    """The site's design in its own coding from its one-shot design ``d`` and the model specs its build left
    in ``specs`` (:func:`fedglmm.model.design.build_design`); None where it must be built (see the module
    docstring; also with several grouping factors)."""
    if d.factors or "x" not in specs:
        return None
    keep = own_columns(specs["x"], d.X.shape[1], specs.get("z", []), sentinel)
    if keep is None:
        return None
    return replace(d, X=d.X[:, keep], x_names=[n for n, k in zip(d.x_names, keep) if k])
