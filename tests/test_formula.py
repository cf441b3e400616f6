"""lme4-style formula parsing: what lme4 itself would do with these formulas (see lme4's findbars /
expandDoubleVerts: ``(x || g)`` is ``(1 | g) + (0 + x | g)``)."""
import sys
from pathlib import Path

import pytest

try:
    import fedglmm  # noqa: F401
except ImportError:      # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fedglmm.errors import InputError
from fedglmm.model.formula import factor_columns, parse_formula, variables
from fedglmm.model.spec import ModelSpec, RandomTerm


def test_contraception_formula():
    f = "use ~ urban + age + I(age**2) + livch + (1 | district)"
    assert parse_formula(f) == ModelSpec(formula=f, response="use", failures=None,
                                         fixed="urban + age + I(age**2) + livch",
                                         random=(RandomTerm("1", "district"),))


def test_implied_intercept_in_random_term_is_explicit():
    s = parse_formula("Reaction ~ Days + (Days | Subject)")
    assert s.fixed == "Days"
    assert s.random == (RandomTerm("1 + Days", "Subject", True),)
    assert s.group == "Subject"


@pytest.mark.parametrize("f, terms", [
    ("y ~ x + (x || g)", [("1", "g", False), ("0 + x", "g", False)]),
    ("y ~ x + (0 + x || g)", [("0 + x", "g", False)]),
    ("y ~ x + (1 + x + z || g)", [("1", "g", False), ("0 + x", "g", False), ("0 + z", "g", False)]),
    ("y ~ x + (1 | g) + (0 + x | g)", [("1", "g", True), ("0 + x", "g", True)]),
    ("y ~ x + (0 + x | g)", [("0 + x", "g", True)]),
    ("y ~ x + (1 + x | g)", [("1 + x", "g", True)]),
    ("y ~ x + (x - 1 | g)", [("x - 1", "g", True)]),
])
def test_random_terms(f, terms):
    assert parse_formula(f).random == tuple(RandomTerm(*t) for t in terms)


def test_cbind_outcome():
    s = parse_formula("cbind(incidence, size - incidence) ~ period + (1 | herd)")
    assert (s.response, s.failures, s.fixed) == ("incidence", "size - incidence", "period")
    assert variables(s) == ["incidence", "size", "period", "herd"]


def test_offset_is_removed_from_fixed_part():
    s = parse_formula("y ~ x + offset(log(t)) + (1|g)")
    assert (s.fixed, s.offsets) == ("x", ("log(t)",))
    assert variables(s) == ["y", "x", "g", "t"]
    assert variables(s, outcome=False, group=False) == ["x", "t"]


@pytest.mark.parametrize("f, fixed", [
    ("y ~ 0 + x", "0 + x"), ("y ~ x - 1", "x - 1"), ("y ~ -1 + x", "-1 + x"), ("y ~ a*b", "a*b"),
    ("y ~ a:b", "a:b"), ("y ~ I(x**2)", "I(x**2)"), ("y ~ (1|g)", "1"), ("y ~ 1", "1"),
    ("y ~ offset(t) + (1|g)", "1"), ("y ~ a + (b + c):d", "a + (b + c):d"),
])
def test_fixed_part(f, fixed):
    assert parse_formula(f).fixed == fixed


def test_no_random_term_is_a_glm():
    s = parse_formula("use ~ urban + age")
    assert s.random == () and s.group is None


def test_variables_skip_functions_and_modules():
    s = parse_formula("log(y) ~ np.log(x) + exp(z) + I(w**2) + C(k) + Q('a b') + `c d` + (1 + x | g)")
    assert variables(s) == ["y", "x", "z", "w", "k", "a b", "c d", "g"]
    assert factor_columns(s) == ["k"]


def test_variables_contraception_order():
    s = parse_formula("use ~ urban + age + I(age**2) + livch + (urban | district)")
    assert variables(s) == ["use", "urban", "age", "livch", "district"]


def one_line_error(formula):
    with pytest.raises(InputError) as e:
        parse_formula(formula)
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg
    return msg


@pytest.mark.parametrize("f, why", [
    ("y ~ (x + z", "unbalanced parentheses"),
    ("y ~ x)", "unbalanced parentheses"),
    ("y x + z", "no '~'"),
    (" ~ x", "empty response"),
    ("y ~ ", "nothing after '~'"),
    ("y ~ x ~ z", "more than one '~'"),
    ("y ~ x + (| g)", "nothing before '|'"),
    ("y ~ x + (1 | )", "no grouping factor"),
    ("y ~ x + (1 | g + h)", "must be a column name"),
    ("y ~ x + (1 ||| g)", "exactly one '|' or '||'"),
    ("y ~ x + (0 | g)", "no columns"),
    ("y ~ I(x**)", "invalid syntax"),
    ("y ~ x +", "missing a term"),
    ("y ~ x + 1 | g", "must be in parentheses"),
    ("y ~ x - (1 | g)", "cannot be subtracted"),
    ("cbind(s) ~ x", "cbind() needs two arguments"),
    ("y ~ x + offset(log(t)", "unbalanced parentheses"),
    ("y + ~ x", "not a valid expression"),
    ("y ~ x + 'a", "unterminated quote"),
])
def test_unparsable_formulas(f, why):
    msg = one_line_error(f)
    assert msg.startswith(f"cannot parse formula '{f.strip()}': ")
    assert why in msg


@pytest.mark.parametrize("f, terms", [
    # lme4's expandSlash: a/b is a + b:a, and the inner factor's name lists its own column first
    ("y ~ (1 | batch/cask)", [("1", "batch", True, ()), ("1", "cask:batch", True, ("cask", "batch"))]),
    ("y ~ (1 | a/b/c)", [("1", "a", True, ()), ("1", "b:a", True, ("b", "a")), ("1", "c:b:a", True, ("c", "b", "a"))]),
    ("y ~ (1 | ward:patient)", [("1", "ward:patient", True, ("ward", "patient"))]),
    ("y ~ (x || a/b)", [("1", "a", False, ()), ("0 + x", "a", False, ()), ("1", "b:a", False, ("b", "a")),
                        ("0 + x", "b:a", False, ("b", "a"))]),
    # terms are ordered by factor (first appearance): each factor's columns are contiguous
    ("y ~ (1 | g) + (1 | h) + (0 + x | g)", [("1", "g", True, ()), ("0 + x", "g", True, ()), ("1", "h", True, ())]),
    ("y ~ x + (1 + x | patient) + (1 | hospital)", [("1 + x", "patient", True, ()), ("1", "hospital", True, ())]),
])
def test_several_grouping_factors(f, terms):
    assert parse_formula(f).random == tuple(RandomTerm(*t) for t in terms)


def test_grouping_columns_and_factor_names():
    s = parse_formula("y ~ x + (1 | `my g`/h) + (1 | k)")
    assert s.groups == ("my g", "h:my g", "k")
    assert s.factor_columns("h:my g") == ("h", "my g") and s.grouping_columns == ("my g", "h", "k")
    assert variables(s) == ["y", "x", "my g", "h", "k"]
    assert variables(s, group=False) == ["y", "x"]


@pytest.mark.parametrize("f", ["y ~ (1 | a/)", "y ~ (1 | a:log(b))", "y ~ (1 | a*b)"])
def test_bad_grouping_factors(f):
    msg = one_line_error(f)
    assert "grouping factor" in msg


def test_column_both_factor_and_number_refused():
    assert "column 'x' is used both as C(x) and as a number" in one_line_error("y ~ C(x) + I(x**2)")


def test_formula_must_be_text():
    with pytest.raises(InputError):
        parse_formula(None)


def test_dotted_and_quoted_names():
    s = parse_formula("Reaction.time ~ my.x + log(`my.t`) + offset(log(`ex.p`)) + (1 | `my g`)")
    assert (s.response, s.group, s.offsets) == ("Reaction.time", "my g", ("log(`ex.p`)",))
    assert variables(s) == ["Reaction.time", "my.x", "my.t", "my g", "ex.p"]


@pytest.mark.parametrize("formula", ["use ~ urban + C(age > 30) + (1 | district)",
                                     "use ~ urban + factor(age > 30) + (1 | district)",
                                     "use ~ urban + (1 + C(age > 30) | district)"])
def test_factor_of_an_expression_is_refused_with_how_to_write_it(formula):
    """The levels of C(expression) would be each site's own: refused before fitting, for every method."""
    with pytest.raises(InputError, match=r"C\(\) or factor\(\) of an expression \('age > 30'\).*C\(column\)"):
        parse_formula(formula)
