"""Data as users have it: separators and encodings, duplicated names, missing values, degenerate data, and
errors that name the file and the line an editor shows.  Each bad input: one line, the right exit code."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedglmm.errors import InputError
from fedglmm.io import load_sites, read_table
from test_cli import assert_clean_error, invoke

SMALL = "use ~ urban + age + livch + (1 | district)"


@pytest.fixture(scope="module")
def contra():
    from test_cli import BUNDLED
    from importlib import resources

    with resources.as_file(BUNDLED) as p:
        return pd.read_csv(p)


def _two_files(tmp_path, df, sep=",", encoding="utf-8", suffix="csv"):
    a, b = df[df.district <= 30], df[df.district > 30]
    paths = [tmp_path / f"A.{suffix}", tmp_path / f"B.{suffix}"]
    for part, path in zip((a, b), paths):
        part.to_csv(path, index=False, sep=sep, encoding=encoding)
    return paths


# --- reading ------------------------------------------------------------------------------------------

def test_semicolon_file_with_sep(tmp_path, contra):
    paths = _two_files(tmp_path, contra, sep=";")
    assert_clean_error(invoke("fit", "-f", SMALL, "--family", "binomial", *paths), 1, "--sep ';'")
    r = invoke("fit", "-f", SMALL, "--family", "binomial", "--sep", ";", "--json", "-", *paths)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["nobs"] == len(contra)
    assert_clean_error(invoke("fit", "-f", SMALL, "--sep", ";;", *paths), 2, "one character")
    tab = tmp_path / "t.csv"
    contra.to_csv(tab, sep="\t", index=False)
    assert len(read_table(tab, sep="\\t")) == len(contra)


def test_latin1_file(tmp_path, contra):
    df = contra.assign(urban=np.where(contra.urban == "Y", "ville", "campagne à l'écart"))
    paths = _two_files(tmp_path, df, encoding="latin-1")
    msg = assert_clean_error(invoke("fit", "-f", SMALL, "--family", "binomial", *paths), 1, "--encoding latin-1")
    assert "A.csv" in msg and "not UTF-8 text" in msg
    r = invoke("fit", "-f", SMALL, "--family", "binomial", "--encoding", "latin-1", "--json", "-", *paths)
    assert r.exit_code == 0, r.stderr
    assert "urban[T.ville]" in json.loads(r.stdout)["fixef"]
    assert_clean_error(invoke("fit", "-f", SMALL, "--encoding", "klingon", *paths), 2, "unknown text encoding")
    sites = load_sites(paths, encoding="latin-1")
    assert "campagne à l'écart" in set(sites["A"].urban)


def test_duplicated_column_names(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("y,x,g,x\n1,2,a,3\n2,3,b,4\n")
    with pytest.raises(InputError) as e:
        read_table(path)
    assert str(e.value) == ("file '" + str(path) + "': column name 'x' appears more than once in the header; "
                            "give each column its own name")
    assert_clean_error(invoke("fit", "-f", "y ~ x + (1 | g)", path), 1, "'x' appears more than once")
    pq = tmp_path / "dup.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pqw

    pqw.write_table(pa.table([pa.array([1]), pa.array([2]), pa.array([3])], names=["a", "b", "a"]), pq)
    with pytest.raises(InputError, match="'a' appears more than once"):
        read_table(pq)


# --- where an error points ------------------------------------------------------------------------------

def test_errors_name_the_file_and_line(tmp_path, contra):
    df = contra.iloc[:200].copy()
    df["age"] = df["age"].astype(object)
    df.loc[df.index[150], "age"] = "abc"                # data row 151: line 152 of the file
    path = tmp_path / "all.csv"
    df.to_csv(path, index=False)
    msg = assert_clean_error(invoke("fit", "-f", SMALL, "--family", "binomial", "--site-column", "region", path), 1)
    assert f"line 152 of '{path}'" in msg, msg


def test_line_numbers_follow_blank_lines_and_quoted_newlines(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text('y,x,note\n1,2,"two\nlines"\n\n3,4,plain\n   \n5,6,"x"\n')
    df = read_table(path)
    assert df.index.tolist() == [2, 5, 7] and df.index.name == "line"
    path.write_text("y,x\n\n1,2\n3,4\n\n5,6\n")
    assert read_table(path).index.tolist() == [3, 4, 6]


def test_outcome_error_names_the_line_of_a_split_file(tmp_path, contra):
    df = contra.copy()
    df.loc[df.index[1000], "use"] = 2
    path = tmp_path / "c.csv"
    df.to_csv(path, index=False)
    msg = assert_clean_error(invoke("fit", "-f", SMALL, "--family", "binomial", "-s", "region", path), 1)
    assert msg.endswith(f"found 2 in line 1002 of '{path}'"), msg


def test_api_rows_count_in_the_frame_given(contra):
    import fedglmm

    df = contra.copy()
    df["age"] = df["age"].astype(object)
    df.loc[df.index[1500], "age"] = "abc"
    with pytest.raises(Exception) as e:
        fedglmm.fit(SMALL, df, family="binomial", site="region")
    assert "in row 1501" in str(e.value)


# --- missing values on the command line -----------------------------------------------------------------

def test_missing_values_are_omitted_and_counted(tmp_path, contra):
    df = contra.copy()
    df.loc[df.index[[3, 10]], "age"] = np.nan
    df.loc[df.index[1900], "livch"] = np.nan          # district > 30: site B
    paths = _two_files(tmp_path, df)
    r = invoke("fit", "-f", SMALL, "--family", "binomial", "--json", "-", *paths)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["omitted"] == {"A": 2, "B": 1} and out["nobs"] == len(df) - 3
    msg = assert_clean_error(invoke("fit", "-f", SMALL, "--family", "binomial", "--na-action", "fail", *paths), 1)
    assert msg == (f"error: site 'A': column 'age' has 2 missing values (first in line 5 of '{paths[0]}'); drop "
                   "those rows, or let the fit omit them (na_action='omit', --na-action omit)")
    assert_clean_error(invoke("fit", "-f", SMALL, "--na-action", "drop", *paths), 2, "na_action")


# --- degenerate data ------------------------------------------------------------------------------------

DEGENERATE = [
    ("all zero", "b ~ x + (1 | g)", "binomial", "binomial outcome 'b' is 0 (failure) in every row at every site"),
    ("all one", "o ~ x + (1 | g)", "binomial", "binomial outcome 'o' is 1 (success) in every row at every site"),
    ("zero counts", "b ~ x + (1 | g)", "poisson", "poisson outcome 'b' is 0 in every row at every site"),
    ("constant gaussian", "c ~ x + (1 | g)", "gaussian", "the outcome is constant"),
    ("gaussian far from 0", "far ~ x + (1 | g)", "gaussian", "its mean is so far from 0 against its spread that the "
                                                              "fit would lose"),
    ("one group gaussian", "y ~ x + (1 | one)", "gaussian", "grouping factor 'one' has a single level ('a')"),
    ("one group binomial", "o2 ~ x + (1 | one)", "binomial", "grouping factor 'one' has a single level"),
    ("no rows left", "y ~ z + (1 | g)", "gaussian", "no rows left after omitting the"),
]


@pytest.mark.parametrize("case,formula,family,fragment", DEGENERATE, ids=[d[0] for d in DEGENERATE])
@pytest.mark.parametrize("method", ["hybrid", "iterative"])
def test_degenerate_data_is_refused(tmp_path, case, formula, family, fragment, method):
    rng = np.random.default_rng(3)
    n = 120
    df = pd.DataFrame({"x": rng.normal(size=n), "g": rng.integers(0, 12, n)})
    df = df.assign(y=df.x + rng.normal(size=n), b=0, o=1, c=5.0, one="a", o2=(rng.random(n) < 0.5) * 1,
                   z=np.where(df.g < 6, np.nan, 1.0))
    df["far"] = df.y + 1e5
    paths = [tmp_path / "A.csv", tmp_path / "B.csv"]
    df[df.g < 6].to_csv(paths[0], index=False)
    df[df.g >= 6].to_csv(paths[1], index=False)
    r = invoke("fit", "-f", formula, "--family", family, "--method", method, *paths)
    assert_clean_error(r, 1, fragment)


def test_gaussian_outcome_far_from_zero_centred_in_the_formula():
    """A gaussian outcome 1e5 SDs from 0 is refused (its sums of squares would leave the fit 6 digits or
    fewer: the logLik was 3e-3 off, in 17-30 rounds), and centred in the formula as the message says it is
    the fit of the centred outcome, to 1e-8 (the intercept moved by the constant); 1e3 SDs from 0 still fit,
    within 1e-6 of it."""
    import fedglmm

    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(50), 12)
    x = rng.normal(size=len(g))
    y = 0.5 * x + rng.normal(0, 0.7, 50)[g] + rng.normal(size=len(g))
    df = pd.DataFrame({"y": y, "far": y + 1e5, "near": y + 1e3, "x": x, "g": g})
    sites = {f"s{i}": df[g % 3 == i].reset_index(drop=True) for i in range(3)}
    ref = fedglmm.fit("y ~ x + (1 | g)", sites, reml=False)
    with pytest.raises(fedglmm.FedGLMMError, match="centre it in the formula"):
        fedglmm.fit("far ~ x + (1 | g)", sites, reml=False)
    res = fedglmm.fit("I(far - 100000) ~ x + (1 | g)", sites, reml=False)
    assert abs(res.loglik - ref.loglik) < 1e-8 and np.allclose(res.fixef, ref.fixef, rtol=0, atol=1e-8)
    near = fedglmm.fit("near ~ x + (1 | g)", sites, reml=False)
    assert abs(near.loglik - ref.loglik) < 1e-6 and abs(near.fixef["x"] - ref.fixef["x"]) < 1e-6


def test_gaussian_covariate_far_from_zero_fitted_exactly():
    """A covariate 1e5 ± 1 (a mean 1e5 of its SDs from 0): the hybrid's one-shot gaussian fit from raw
    per-group cross-products was 5e-4 off in logLik (its slope 6 % off at 1e7 ± 1); such a fit now goes on
    to Newton rounds, on the sites' centred scale, and equals the fit of the centred covariate to 1e-8 --
    pooled and over 3 sites -- while a covariate near 0 is still exact after the first round."""
    import fedglmm

    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(50), 12)
    x = rng.normal(size=len(g))
    y = 0.5 * x + rng.normal(0, 0.7, 50)[g] + rng.normal(size=len(g))
    df = pd.DataFrame({"y": y, "x": x, "far": x + 1e5, "g": g})
    for data in (df, {f"s{i}": df[g % 3 == i].reset_index(drop=True) for i in range(3)}):
        ref = fedglmm.fit("y ~ x + (1 | g)", data, reml=False)
        far = fedglmm.fit("y ~ far + (1 | g)", data, reml=False)
        assert ref.rounds == 1 and far.rounds <= 4
        assert abs(far.loglik - ref.loglik) < 1e-8 and abs(far.fixef["far"] - ref.fixef["x"]) < 1e-8
        assert abs(far.random[0]["sd"] - ref.random[0]["sd"]) < 1e-8 and abs(far.se["far"] - ref.se["x"]) < 1e-8
