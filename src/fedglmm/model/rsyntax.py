"""R's formula idioms, written as lme4 users write them, turned into what formulaic and Python read.

Done on the formula's text before it is parsed (:func:`fedglmm.model.formula.parse_formula`):

* ``^`` is a power wherever R evaluates arithmetic: inside any function call (``I(x^2)``, ``log(x^2)``,
  ``offset(t^0.5)``) and on the left of ``~``; between terms it stays formulaic's interaction power
  (``(a + b)^2``).  Python would read ``x^2`` as a bitwise XOR, silently for whole numbers.
* ``factor(x)`` and ``as.factor(x)`` are ``C(x)`` (x a factor whatever its storage), and a grouping
  factor ``(1 | factor(g))`` is ``(1 | g)`` (grouping factors are factors anyway);
  ``as.numeric(x)`` is ``as_numeric(x)`` (a dotted name is not a Python function name);
  ``TRUE`` and ``FALSE`` are ``True`` and ``False`` (``scale(x, center = FALSE)``).
* ``y ~ .`` stands for every column but the response, the grouping factors and the site column
  (:func:`expand_dot`, once the columns are known: :func:`fedglmm.model.options.expand_request`).

The functions the formula may call beyond formulaic's own (``log``, ``exp``, ``C``, ``I``, ...) are
:data:`FUNCTIONS`: ``sqrt``, ``log1p``, ``expm1``, ``abs`` and ``as_numeric``; the stateful ones
(``center``, ``scale``, ``poly``, ...) are in :mod:`fedglmm.model.transforms`.
"""
from __future__ import annotations

import re

_NAME_CHARS = re.compile(r"[\w.]")
_RENAMES = {"factor": "C", "as.factor": "C", "as.numeric": "as_numeric"}


def _scan(text: str):
    """Yield ``(i, ch, quoted)`` for each character: ``quoted`` inside quotes or backticks."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            yield i, ch, True
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
            yield i, ch, True
        else:
            yield i, ch, False


def _name_before(text: str, i: int) -> str:
    """The name (letters, digits, _ and .) that ends just before position ``i``, skipping spaces."""
    j = i
    while j > 0 and text[j - 1] == " ":
        j -= 1
    k = j
    while k > 0 and _NAME_CHARS.match(text[k - 1]):
        k -= 1
    return text[k:j]


def r_idioms(formula: str) -> str:
    """The formula with R's ``^`` (inside calls and on the left side), ``factor()``, ``as.factor()``,
    ``as.numeric()``, ``TRUE`` and ``FALSE`` rewritten (see the module docstring); anything else, and
    anything quoted, is left as written."""
    formula = _unquoted_sub(formula, _GROUP_FACTOR, lambda m: "| " + m.group(1))     # (1 | factor(g)): g
    formula = _unquoted_sub(formula, _RENAMED, lambda m: _RENAMES[m.group(1)])
    out, calls, lhs = [], [], "~" in formula
    for i, ch, quoted in _scan(formula):
        if quoted:
            pass
        elif ch == "(":                         # a call if a name comes just before the bracket
            name = _name_before(formula, i)
            calls.append(bool(name) and not name[0].isdigit())
        elif ch == ")" and calls:
            calls.pop()
        elif ch == "~":
            lhs = False
        elif ch == "^" and (lhs or any(calls)):
            ch = "**"
        out.append(ch)
    return _unquoted_sub("".join(out), _LOGICAL, lambda m: m.group(0).capitalize())


_RENAMED = re.compile(r"(?<![\w.])(as\.factor|factor|as\.numeric)(?=\s*\()")
_GROUP_FACTOR = re.compile(r"\|\s*(?:as\.)?factor\(\s*([A-Za-z_.][\w.]*)\s*\)")
_LOGICAL = re.compile(r"(?<![\w.])(TRUE|FALSE)(?![\w.])")


def _unquoted_sub(text: str, pattern: re.Pattern, repl) -> str:
    """``pattern.sub`` on the parts of ``text`` outside quotes and backticks."""
    runs, cur, flag = [], [], False
    for _, ch, quoted in _scan(text):
        if quoted != flag and cur:
            runs.append((flag, "".join(cur)))
            cur = []
        flag = quoted
        cur.append(ch)
    runs.append((flag, "".join(cur)))
    return "".join(part if quoted else pattern.sub(repl, part) for quoted, part in runs)


# --- y ~ . ---------------------------------------------------------------------------------------------

def _dots(text: str) -> list[int]:
    """Positions of a lone ``.`` (not part of a name or number) outside quotes."""
    found = []
    for i, ch, quoted in _scan(text):
        if ch != "." or quoted:
            continue
        before = text[i - 1] if i else " "
        after = text[i + 1] if i + 1 < len(text) else " "
        if not (_NAME_CHARS.match(before) or _NAME_CHARS.match(after)):
            found.append(i)
    return found


def _rhs_start(formula: str) -> int:
    """Index just after the first ``~`` outside quotes (0 if there is none)."""
    return next((i + 1 for i, ch, quoted in _scan(formula) if ch == "~" and not quoted), 0)


def has_dot(formula: str) -> bool:
    """True if the right-hand side uses ``.`` (every other column)."""
    start = _rhs_start(formula)
    return bool(start and _dots(formula[start:]))


def without_dot(formula: str) -> str:
    """The formula with ``.`` read as ``1``: what can be checked before the columns are known."""
    return _replace_dots(formula, "1")


def expand_dot(formula: str, columns, exclude=()) -> str:
    """``.`` replaced by ``(a + b + ...)``: ``columns`` in their order, less ``exclude`` (the response's
    columns, the grouping columns, the site column); names that are not identifiers are backquoted."""
    names = [c for c in map(str, columns) if c not in set(map(str, exclude))]
    if not names:
        return _replace_dots(formula, "1")
    terms = " + ".join(c if c.isidentifier() else f"`{c}`" for c in names)
    return _replace_dots(formula, f"({terms})")


def _replace_dots(formula: str, text: str) -> str:
    start = _rhs_start(formula)
    if not start:
        return formula
    rhs = formula[start:]
    for i in reversed(_dots(rhs)):
        rhs = rhs[:i] + text + rhs[i + 1:]
    return formula[:start] + rhs


# --- functions the formula may call -----------------------------------------------------------------

def as_numeric(x):
    """R's ``as.numeric``: numbers stay numbers; text (or a factor) whose labels are numbers becomes those
    numbers (as R does for text); a label that is not a number is an error."""
    import numpy as np
    import pandas as pd

    s = pd.Series(np.asarray(x, dtype=object) if isinstance(getattr(x, "dtype", None), pd.CategoricalDtype)
                  else x)
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=float)
    values = pd.to_numeric(s.astype(str), errors="coerce")
    bad = values.isna() & s.notna()
    if bad.any():
        raise ValueError(f"as.numeric(): '{s[bad].iloc[0]}' is not a number")
    return values.to_numpy(dtype=float)


def functions() -> dict:
    """The plain functions a formula may call beyond formulaic's: R's names for numpy's."""
    import numpy as np

    return {"sqrt": np.sqrt, "log1p": np.log1p, "expm1": np.expm1, "abs": np.abs, "as_numeric": as_numeric}
