"""lme4-style formulas -> :class:`~fedglmm.model.spec.ModelSpec`.

Accepted syntax (the fixed part and the left sides of random terms are formulaic right-hand sides)::

    y ~ x + I(x**2) + f + (1 + x | g)          correlated random intercept and slope
    y ~ x + (x || g)                           uncorrelated: (1 | g) + (0 + x | g), as lme4 expands it
    cbind(successes, trials - successes) ~ x   binomial with trials
    y ~ x + offset(log(t)) + (1 | g)           offsets are taken out of the fixed part
    y ~ x + (1 + x | patient) + (1 | hospital) several grouping factors, nested or crossed
    y ~ 1 + (1 | batch/cask)                   nested: (1 | batch) + (1 | cask:batch), as lme4
    y ~ 1 + (1 | ward:patient)                 a factor whose levels are the pairs of two columns

A grouping factor is a column, or columns joined by ``:`` (its levels are their labels joined by ``:``);
``a/b`` stands for the factors ``a`` and ``b:a`` (``a/b/c`` adds ``c:b:a``), named as lme4 names them.
The terms are ordered by factor (first appearance), so each factor's random-effect columns are
contiguous.  Outcome, ``cbind`` arguments and offsets are Python expressions over the columns (``log``,
``exp``, ``np.*`` allowed).  R's idioms (``I(x^2)``, ``factor(g)``, ``as.numeric(x)``, ``y ~ .``) are
read as R reads them (:mod:`fedglmm.model.rsyntax`).  ``C(x)`` marks a column as a factor even if it
holds numbers; its levels are agreed by the sites (see :func:`factor_columns`).
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache, wraps

from . import deferred  # noqa: F401 -- first: formulaic's scipy.sparse.linalg is then loaded on first use
from formulaic import Formula
from formulaic.errors import FormulaicError
from formulaic.formula import SimpleFormula
from formulaic.parser import DefaultFormulaParser

from ..errors import InputError
from .rsyntax import has_dot, r_idioms
from .spec import ModelSpec, RandomTerm
from .transforms import check_transforms

_OPEN, _CLOSE, _QUOTES = "([{", ")]}", "'\"`"
_PLAIN_NAME = re.compile(r"[A-Za-z_.][\w.]*")
_BACKTICK = re.compile(r"`([^`]+)`")
_MODULES = {"np", "numpy", "math", "scipy", "pd", "pandas", "contr"}   # attribute roots that are not columns
_ANSI = re.compile(r"\x1b\[[0-9;]*m|[⧛⧚]")


class _Bad(Exception):
    """Internal: why a formula cannot be parsed."""


# --- public ---------------------------------------------------------------------------------------

def parse_formula(formula: str) -> ModelSpec:
    """Parse an lme4-style formula; raise :class:`InputError` (one line) if it cannot be used."""
    if not isinstance(formula, str):
        raise InputError(f"the formula must be text, not {type(formula).__name__}")
    return _parse_cached(formula)


def request_spec(req: dict) -> ModelSpec:
    """The model a request names: formula, weights and offset columns (:attr:`ModelSpec.columns_payload`)."""
    return parse_formula(req["formula"]).with_columns(req.get("weights"), req.get("offset"))


@lru_cache(maxsize=256)
def _parse_cached(formula: str) -> ModelSpec:
    """The parse itself; a ModelSpec is immutable, so every site and round can share one."""
    shown = " ".join(formula.split())
    if has_dot(formula):
        raise InputError(f"formula '{shown}': '.' (every other column) is expanded where the data's columns are "
                         "known (fedglmm.fit, fedglmm fit); here it cannot be")
    try:
        spec = _parse(formula)
    except _Bad as e:
        raise InputError(f"cannot parse formula '{shown}': {e}") from None
    _check_factor_use(spec, shown)
    check_transforms(spec, shown)
    return spec


def variables(spec: ModelSpec, *, outcome: bool = True, group: bool = True) -> list[str]:
    """Data columns the model uses, in order of first appearance: outcome (and ``cbind`` failures), fixed
    part, random terms, grouping column, offsets, prior weights.  ``outcome=False`` / ``group=False`` leave
    out the outcome and weights / the grouping columns (prediction on new data needs none of them).
    Function names (``log``, ``I``, ``np.exp``) are not columns; ``Q('a b')`` names column ``a b``."""
    names: list[str] = []
    if outcome:
        names += expression_columns(spec.response) + (expression_columns(spec.failures) if spec.failures else [])
    names += _rhs_names(spec.fixed)
    for term in spec.random:
        names += _rhs_names(term.expr)
    if group:
        names += list(spec.grouping_columns)
    for off in spec.offsets:
        names += expression_columns(off)
    if outcome and spec.weights is not None:
        names.append(spec.weights)
    return list(dict.fromkeys(names))


def expression_columns(expr: str) -> list[str]:
    """Columns in a Python expression such as ``size - incidence`` or ``np.log(t)``, in reading order.

    A plain name, dotted or not (``Reaction.time``), is one column, as formulaic reads it on the right
    side; inside larger expressions such names need backticks (``log(`Reaction.time`)``).
    """
    return [expr] if is_plain_name(expr) else list(dict.fromkeys(_py_names(expr)))


def is_plain_name(expr: str) -> bool:
    """True for a bare column name such as ``age`` or ``Reaction.time``."""
    return bool(_PLAIN_NAME.fullmatch(expr))


def factor_columns(spec: ModelSpec) -> list[str]:
    """Columns used as ``C(column)`` in the fixed or random part: factors whatever their storage."""
    exprs = [spec.fixed] + [t.expr for t in spec.random]
    found = [name for e in exprs for tok in _tokens(e) if tok.kind.name == "PYTHON"
             for name in _c_args(str(tok))]
    return list(dict.fromkeys(found))


# --- parsing --------------------------------------------------------------------------------------

def _parse(formula: str) -> ModelSpec:
    lhs, rhs = _split_tilde(r_idioms(formula))          # R's ^, factor(), as.numeric() (model/rsyntax.py)
    response, failures = _outcome(lhs)
    fixed, random, offsets = [], [], []
    for sign, piece in _signed_pieces(rhs):
        inner = _unwrap(piece)
        off = _unwrap(piece[len("offset"):].lstrip()) if piece.startswith("offset") else None
        if inner is not None and _top(inner, "|"):
            _require_plus(sign, piece, "a random term")
            random += _random_terms(inner, piece)
        elif off is not None:
            _require_plus(sign, piece, "an offset")
            offsets.append(_python(off.strip(), "offset"))
        elif _top(piece, "|"):
            raise _Bad(f"random-effects term '{piece}' must be in parentheses, e.g. '(1 | g)'")
        else:
            fixed.append(f"{sign} {piece}")
    joined = " ".join(fixed)                       # "+ a + b - 1"
    fixed_text = (joined[2:] if joined[0] == "+" else "-" + joined[2:]) if fixed else "1"
    _rhs_formula(fixed_text, "the fixed part")
    first = {g: i for i, g in reversed(list(enumerate(t.group for t in random)))}
    random = sorted(random, key=lambda t: first[t.group])         # stable: each factor's terms together
    return ModelSpec(formula=formula, response=response, failures=failures, fixed=fixed_text,
                     random=tuple(random), offsets=tuple(offsets))


def _split_tilde(formula: str) -> tuple[str, str]:
    cuts = _top(formula, "~")
    if not cuts:
        raise _Bad("no '~' between the outcome and the predictors")
    if len(cuts) > 1:
        raise _Bad("more than one '~'")
    lhs, rhs = formula[:cuts[0]].strip(), formula[cuts[0] + 1:].strip()
    if not lhs:
        raise _Bad("empty response (nothing before '~')")
    if not rhs:
        raise _Bad("no predictors (nothing after '~'); write '1' for an intercept-only model")
    return lhs, rhs


def _outcome(lhs: str) -> tuple[str, str | None]:
    args = _unwrap(lhs[len("cbind"):].lstrip()) if lhs.startswith("cbind") else None
    if args is None:
        return _python(lhs, "response"), None
    parts = [p.strip() for p in _split(args, ",")]
    if len(parts) != 2 or not all(parts):
        raise _Bad("cbind() needs two arguments: successes and failures")
    return _python(parts[0], "cbind() argument"), _python(parts[1], "cbind() argument")


def _random_terms(inner: str, piece: str) -> list[RandomTerm]:
    bars = _top(inner, "|")
    if not (len(bars) == 1 or (len(bars) == 2 and bars[1] == bars[0] + 1)):
        raise _Bad(f"random term '{piece}' must have exactly one '|' or '||'")
    correlated = len(bars) == 1                                   # '||': uncorrelated
    lhs, grp = inner[:bars[0]].strip(), inner[bars[-1] + 1:].strip()
    if not lhs:
        raise _Bad(f"random term '{piece}' has nothing before '|' (write '1 | g' for an intercept)")
    if not grp:
        raise _Bad(f"random term '{piece}' has no grouping factor after '|'")
    factors = _group_factors(grp)
    terms = list(_rhs_formula(lhs, f"random term '{piece}'"))
    if not terms:
        raise _Bad(f"random term '{piece}' has no columns")
    has_int = any(str(t) == "1" for t in terms)
    if correlated:
        explicit = any(s == "+" and p == "1" for s, p in _signed_pieces(lhs))
        parts = [lhs if explicit or not has_int else f"1 + {lhs}"]
    else:
        parts = (["1"] if has_int else []) + [f"0 + {_term_text(t)}" for t in terms if str(t) != "1"]
    return [RandomTerm(p, name, correlated, cols if cols != (name,) else ())
            for name, cols in factors for p in parts]


def _group_factors(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """The grouping factors of the right side of a random term, as (name, columns): ``g`` -> g;
    ``a:b`` -> a:b; ``a/b`` -> a and b:a (lme4's names; ``a/b/c`` adds c:b:a)."""
    nested = [[_group_column(c.strip(), text) for c in _split(part, ":")] for part in _split(text, "/")]
    out, outer = [], []
    for cols in nested:
        outer = cols + outer                       # b:a -- the inner factor's columns first
        out.append((":".join(outer), tuple(outer)))
    return out


def _group_column(name: str, text: str) -> str:
    if name.startswith("`") and name.endswith("`") and len(name) > 2:
        return name[1:-1]
    if _PLAIN_NAME.fullmatch(name):
        return name
    if not name:
        raise _Bad(f"grouping factor '{text}' has an empty part")
    raise _Bad(f"grouping factor '{text}' must be a column name, or column names joined by ':' or '/'")


def _require_plus(sign: str, piece: str, what: str) -> None:
    if sign != "+":
        raise _Bad(f"{what} cannot be subtracted: '- {piece}'")


# --- validation through formulaic and Python's ast ------------------------------------------------

def _rhs_formula(text: str, what: str) -> SimpleFormula:
    try:
        f = Formula(text)
    except (FormulaicError, SyntaxError, ValueError, TypeError) as e:
        why = e.msg if isinstance(e, SyntaxError) else _first_line(e)
        raise _Bad(f"{what} '{text}': {why}") from None
    if not isinstance(f, SimpleFormula):
        raise _Bad(f"{what} '{text}' must not contain '~' or '|'")
    return f


def _python(expr: str, what: str) -> str:
    try:
        _ast(expr)
    except SyntaxError as e:
        raise _Bad(f"{what} '{expr}' is not a valid expression ({e.msg})") from None
    return expr


def _check_factor_use(spec: ModelSpec, shown: str) -> None:
    """A column inside ``C()`` becomes a factor for the whole model, so it cannot also be a number; and
    ``C()`` takes a column: the levels of an expression could not be agreed between sites."""
    exprs = [spec.fixed] + [t.expr for t in spec.random]
    inner = [a for e in exprs for tok in _tokens(e) if tok.kind.name == "PYTHON" for a in _c_args(str(tok), True)]
    if inner:
        raise InputError(f"formula '{shown}': C() or factor() of an expression ('{inner[0]}') is not supported; "
                         "add it to the data as a column and write C(column)")
    factors = set(factor_columns(spec))
    if not factors:
        return
    plain = [n for e in exprs for n in _rhs_names(e, skip_c=True)]
    plain += [n for e in (spec.response, spec.failures, *spec.offsets) if e for n in expression_columns(e)]
    both = [n for n in dict.fromkeys(plain) if n in factors]
    if both:
        raise InputError(f"formula '{shown}': column '{both[0]}' is used both as C({both[0]}) and as a number")


# --- names ----------------------------------------------------------------------------------------

def _tokens(text: str):
    return DefaultFormulaParser().get_tokens(text)


def _rhs_names(text: str, skip_c: bool = False) -> list[str]:
    names: list[str] = []
    for tok in _tokens(text):
        if tok.kind.name == "NAME":
            names.append(str(tok))
        elif tok.kind.name == "PYTHON":
            names += _py_names(str(tok), skip_c)
    return names


def _py_names(expr: str, skip_c: bool = False) -> list[str]:
    """Column names in a Python expression, in reading order; `quoted names` are columns too."""
    tree, quoted = _ast(expr)
    not_cols, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            not_cols.add(id(node.func))
            if skip_c and node.func.id == "C" and node.args:
                not_cols.add(id(node.args[0]))
            if node.func.id == "Q" and node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, node.col_offset, str(node.args[0].value)))
        elif isinstance(node, ast.Attribute):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in _MODULES:
                not_cols.add(id(root))
        elif isinstance(node, ast.Name):
            found.append((node.lineno, node.col_offset, node))
    cols = [(r, c, n if isinstance(n, str) else quoted.get(n.id, n.id)) for r, c, n in found
            if isinstance(n, str) or id(n) not in not_cols]
    return [name for _, _, name in sorted(cols, key=lambda x: x[:2])]


def _c_args(expr: str, expressions: bool = False) -> list[str]:
    """Plain names given as first argument of ``C(...)`` in a Python expression (``expressions``: the
    first arguments that are not plain names, as text)."""
    tree, quoted = _ast(expr)
    calls = [node.args[0] for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == "C" and node.args]
    if expressions:
        return [ast.unparse(a) for a in calls if not isinstance(a, ast.Name)]
    return [quoted.get(a.id, a.id) for a in calls if isinstance(a, ast.Name)]


def _ast(expr: str) -> tuple[ast.Expression, dict[str, str]]:
    """Parse a Python expression whose `quoted names` are replaced by placeholders -> names."""
    quoted: dict[str, str] = {}

    def hide(m):
        quoted[f"_bq{len(quoted)}_"] = m.group(1)
        return f"_bq{len(quoted) - 1}_"

    return ast.parse(_BACKTICK.sub(hide, expr), mode="eval"), quoted


def _term_text(term) -> str:
    """A formulaic term written back as formula text (backticks around names that need them)."""
    return ":".join(f"`{f.expr}`" if f.eval_method.name == "LOOKUP" and not f.expr.isidentifier()
                    else f.expr for f in term.factors)


# --- scanning text at the top level (outside brackets and quotes) ---------------------------------

def _top_positions(s: str) -> list[int]:
    """Indices of the characters of ``s`` outside any bracket or quote."""
    depth, quote, out = 0, None, []
    for i, ch in enumerate(s):
        if quote:
            quote = None if ch == quote else quote
        elif ch in _QUOTES:
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise _Bad("unbalanced parentheses")
        elif depth == 0:
            out.append(i)
    if depth or quote:
        raise _Bad("unbalanced parentheses" if depth else "unterminated quote")
    return out


def _top(s: str, ch: str) -> list[int]:
    return [i for i in _top_positions(s) if s[i] == ch]


def _split(s: str, ch: str) -> list[str]:
    cuts = [-1] + _top(s, ch) + [len(s)]
    return [s[a + 1:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _signed_pieces(rhs: str) -> list[tuple[str, str]]:
    """Split a right-hand side at top-level ``+`` and ``-``: [(sign, text), ...]."""
    cuts = [i for i in _top_positions(rhs) if rhs[i] in "+-"]
    bounds = [-1] + cuts + [len(rhs)]
    signs = ["+"] + [rhs[i] for i in cuts]
    pieces = [(sg, rhs[a + 1:b].strip()) for sg, a, b in zip(signs, bounds[:-1], bounds[1:])]
    if len(pieces) > 1 and not pieces[0][1]:          # a leading unary sign, as in '-1 + x'
        pieces = pieces[1:]
    if any(not p for _, p in pieces):
        raise _Bad("a '+' or '-' is missing a term")
    return pieces


def _unwrap(piece: str) -> str | None:
    """The inside of ``(...)`` if the whole piece is one bracketed group, else None."""
    if piece.startswith("(") and piece.endswith(")") and not _top_positions(piece):
        return piece[1:-1]
    return None


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


# Every site evaluates these for the same formula in every request; cache them, handing out fresh lists.
def _cached_list(fn):
    cached = lru_cache(maxsize=1024)(lambda *a, **k: tuple(fn(*a, **k)))

    @wraps(fn)
    def wrapper(*args, **kwargs):
        return list(cached(*args, **kwargs))

    return wrapper


variables = _cached_list(variables)
factor_columns = _cached_list(factor_columns)
expression_columns = _cached_list(expression_columns)
