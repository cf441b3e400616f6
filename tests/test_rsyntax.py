"""R's formula idioms as lme4 users write them: ^ inside calls, factor(), as.factor(), as.numeric(),
y ~ ., and R's names of the common functions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.api import make_sites
from fedglmm.errors import InputError
from fedglmm.model.formula import parse_formula
from fedglmm.model.rsyntax import expand_dot, has_dot, r_idioms
from fedglmm.transport import InProcessTransport
from heldout_data import assert_same_fit
from test_cli import assert_clean_error, invoke

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def contra():
    return pd.read_csv(DATA / "contraception.csv")


@pytest.mark.parametrize("written,read", [
    ("y ~ I(x^2) + (a + b)^2 + (1 | g)", "y ~ I(x**2) + (a + b)^2 + (1 | g)"),     # between terms: interactions
    ("log(y)^2 ~ log(x^2) + offset(t^0.5)", "log(y)**2 ~ log(x**2) + offset(t**0.5)"),
    ("y ~ factor(g) + as.factor( h ) + as.numeric(z)", "y ~ C(g) + C( h ) + as_numeric(z)"),
    ("y ~ x + (1 | factor(g)) + (x || as.factor(h))", "y ~ x + (1 | g) + (x || h)"),
    ("y ~ np.factor(q) + my_factor(x) + `a^b` + I('^')", "y ~ np.factor(q) + my_factor(x) + `a^b` + I('^')"),
])
def test_r_idioms_rewrite(written, read):
    assert r_idioms(written) == read


def test_dot_expansion():
    assert has_dot("y ~ . + (1 | g)") and not has_dot("y ~ x.1 + a.b + 0.5") and not has_dot("y.z ~ x")
    assert expand_dot("y ~ . - x", ["y", "x", "a b", "g"], ["y", "g"]) == "y ~ (x + `a b`) - x"
    with pytest.raises(InputError, match="'.'"):
        parse_formula("y ~ . + (1 | g)")


def test_power_caret_equals_double_star(contra):
    a = fedglmm.fit("use ~ urban + age + I(age^2) + livch + (1 | district)", contra, family="binomial")
    b = fedglmm.fit("use ~ urban + age + I(age**2) + livch + (1 | district)", contra, family="binomial")
    assert list(a.fixef.index) == list(b.fixef.index) and "I(age ** 2)" in a.fixef.index
    assert_same_fit(a, b, tol=1e-12)
    # integers: Python's ^ would have been a silent XOR (3 ^ 2 == 1)
    df = contra.assign(k=contra.livch.str[0].astype(int))
    c = fedglmm.fit("use ~ I(k^2) + (1 | district)", df, family="binomial")
    d = fedglmm.fit("use ~ I(k*k) + (1 | district)", df, family="binomial")
    assert np.allclose(c.fixef.values, d.fixef.values, rtol=1e-12)


@pytest.mark.parametrize("written", ["factor(livch)", "as.factor(livch)"])
def test_factor_equals_c(contra, written):
    a = fedglmm.fit(f"use ~ urban + {written} + (1 | district)", contra, family="binomial")
    b = fedglmm.fit("use ~ urban + C(livch) + (1 | district)", contra, family="binomial")
    assert list(a.fixef.index) == list(b.fixef.index)
    assert_same_fit(a, b, tol=1e-12)


def test_r_function_names(contra):
    df = contra.assign(a=contra.age - contra.age.min() + 1, age_text=contra.age.astype(str))
    written = fedglmm.fit("use ~ sqrt(a) + log1p(a) + abs(age) + exp(age / 20) + log(a + 3) + (1 | district)", df,
                          family="binomial", method="iterative")
    pre = df.assign(s=np.sqrt(df.a), l1=np.log1p(df.a), ab=np.abs(df.age), e=np.exp(df.age / 20), lg=np.log(df.a + 3))
    direct = fedglmm.fit("use ~ s + l1 + ab + e + lg + (1 | district)", pre, family="binomial", method="iterative")
    assert np.allclose(written.fixef.values, direct.fixef.values, rtol=1e-10, atol=1e-12)
    num = fedglmm.fit("use ~ as.numeric(age_text) + (1 | district)", df, family="binomial", method="iterative")
    ref = fedglmm.fit("use ~ age + (1 | district)", df, family="binomial", method="iterative")
    assert np.allclose(num.fixef.values, ref.fixef.values, rtol=1e-10)


def test_dot_on_a_three_column_file(tmp_path):
    rng = np.random.default_rng(5)
    n = 300
    g = rng.integers(0, 20, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=20)[g] + rng.normal(size=n)
    path = tmp_path / "three.csv"
    pd.DataFrame({"y": y, "x": x, "g": g}).to_csv(path, index=False)
    r = invoke("fit", "-f", "y ~ . + (1 | g)", "--json", "-", path)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out["fixef"]) == ["Intercept", "x"] and out["formula"] == "y ~ (x) + (1 | g)"
    # a GLM with y ~ . : every column but the response
    r = invoke("fit", "-f", "y ~ .", "--json", "-", path)
    assert r.exit_code == 0 and list(json.loads(r.stdout)["fixef"]) == ["Intercept", "x", "g"]


def test_dot_leaves_out_the_site_column():
    from test_cli import BUNDLED

    df = pd.read_csv(str(BUNDLED)).drop(columns=["woman"])
    res = fedglmm.fit("use ~ . + (1 | district)", df, family="binomial", site="region", method="iterative")
    ref = fedglmm.fit("use ~ livch + age + urban + (1 | district)", df, family="binomial", site="region",
                      method="iterative")
    assert sorted(res.fixef.index) == sorted(ref.fixef.index)
    assert np.allclose(res.fixef[ref.fixef.index], ref.fixef, rtol=1e-10)


def test_dot_over_a_transport_asks_the_sites_for_their_columns(contra):
    df = contra.drop(columns=["woman"])
    sites = {k: v for k, v in df.groupby(df.district % 3)}
    dot = fedglmm.api.fit_on(InProcessTransport(make_sites({str(k): v for k, v in sites.items()})),
                             "use ~ . - livch + (1 | district)", family="binomial", method="iterative")
    plain = fedglmm.fit("use ~ age + urban + (1 | district)", {str(k): v for k, v in sites.items()},
                        family="binomial", method="iterative")
    assert dot.rounds == plain.rounds + 1                  # one describe round, for the columns
    assert_same_fit(dot, plain, tol=1e-12)


def test_dot_errors_are_one_line(tmp_path):
    path = tmp_path / "two.csv"
    pd.DataFrame({"y": [1.0, 2, 3, 4], "g": [1, 1, 2, 2]}).to_csv(path, index=False)
    r = invoke("fit", "-f", "y ~ . + (1 | g)", "--json", "-", path)      # nothing left: y ~ 1 + (1 | g)
    assert r.exit_code == 0, r.stderr
    assert_clean_error(invoke("fit", "-f", "y ~ .. + (1 | g)", path), 2, "formula")
