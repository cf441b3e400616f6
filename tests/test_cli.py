"""The command line: demo, fit over files, and one-line errors with fixed exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedglmm
from fedglmm import cli

BUNDLED = resources.files("fedglmm") / "data" / "contraception.csv"
FORMULA = "use ~ urban + age + I(age**2) + livch + (1 | district)"
SMALL = "use ~ urban + age + livch + (1 | district)"
JSON_KEYS = {"fixef", "se", "random", "loglik", "aic", "bic", "nobs", "ngroups", "nsites", "rounds",
             "bytes_to_sites", "bytes_from_sites", "converged", "seconds", "method", "nagq"}

# glmmTMB 1.1.5 and lme4 1.1-31 on the same model and data (/work/shared/reference, case contraception_la)
TMB_LOGLIK = -1186.36429118191
TMB_FIXEF = {"Intercept": -1.03507584354086, "urban[T.Y]": 0.69727019915027, "age": 0.00353330102541809,
             "I(age ** 2)": -0.00456234789103443, "livch[T.1]": 0.815053768194339,
             "livch[T.2]": 0.916495972634558, "livch[T.3+]": 0.915084790413941}

try:                                   # click < 8.2 mixes stderr into stdout unless told not to
    runner = CliRunner(mix_stderr=False)
except TypeError:
    runner = CliRunner()


@pytest.fixture(scope="module")
def contra() -> pd.DataFrame:
    with resources.as_file(BUNDLED) as p:
        return pd.read_csv(p)


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


def run_subprocess(*args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "fedglmm.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, **kw)


def assert_clean_error(result, code=None, fragment=None):
    """Exit ≠ 0 (or == code), one line 'error: …' on stderr, no traceback, no fit printed."""
    stderr = result.stderr
    assert result.exit_code != 0 if hasattr(result, "exit_code") else result.returncode != 0
    rc = result.exit_code if hasattr(result, "exit_code") else result.returncode
    if code is not None:
        assert rc == code, (rc, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "Traceback" not in result.stdout
    assert result.stdout == "", result.stdout
    if fragment is not None:
        assert fragment in lines[0], lines[0]
    if hasattr(result, "exception") and result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return lines[0]


# --- version and help -------------------------------------------------------------------------------

def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"fedglmm {fedglmm.__version__}"


def test_help_without_command():
    r = invoke()
    assert r.exit_code == 0 and "fit" in r.stdout and "demo" in r.stdout


# --- demo -------------------------------------------------------------------------------------------

def test_demo_json_to_stdout():
    r = invoke("demo", "--json", "-", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""
    out = json.loads(r.stdout)
    assert JSON_KEYS <= set(out)
    assert out["nsites"] == 4 and out["nobs"] == 1934 and out["ngroups"] == {"district": 60}
    assert out["method"] == "Laplace" and out["nagq"] == 1 and out["converged"] is True
    assert out["bytes_to_sites"] > 0 and out["bytes_from_sites"] > 0 and 2 <= out["rounds"] <= 4
    # at least as good as glmmTMB's optimum, and the same coefficients
    assert out["loglik"] >= TMB_LOGLIK - 1e-6
    for name, value in TMB_FIXEF.items():
        assert out["fixef"][name] == pytest.approx(value, abs=2e-3)


def test_demo_subprocess(tmp_path):
    """The real entry point: summary and one line on stdout, JSON file written, stderr silent (no TTY)."""
    out = tmp_path / "demo.json"
    r = run_subprocess("demo", "--json", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "Fixed effects:" in r.stdout and "Random effects:" in r.stdout
    assert "\x1b" not in r.stdout           # plain text when piped
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: ") and "4 sites" in last and "rounds" in last and "bytes" in last
    data = json.loads(out.read_text())
    assert JSON_KEYS <= set(data)
    assert data["nsites"] == 4


def test_demo_notes_go_to_stderr_with_json_stdout():
    r = invoke("demo", "--json", "-")
    assert r.exit_code == 0
    json.loads(r.stdout)
    assert r.stderr.startswith("demo: ")


# --- fit over files ---------------------------------------------------------------------------------

def _write(df: pd.DataFrame, path):
    path = str(path)
    if path.endswith((".parquet", ".pq")):
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False, sep="\t" if ".tsv" in path else ",")
    return path


def _split_files(contra, tmp_path, kinds=("csv", "parquet", "csv", "parquet")):
    return [_write(part, tmp_path / f"{region}.{kind}")
            for (region, part), kind in zip(contra.groupby("region"), kinds)]


def test_files_equal_site_column(tmp_path, contra):
    files = _split_files(contra, tmp_path, kinds=("csv", "parquet", "tsv", "csv.gz"))
    one = _write(contra, tmp_path / "all.csv")
    a = invoke("fit", "-f", FORMULA, "--family", "binomial", "--json", "-", "--quiet", *files)
    b = invoke("fit", "-f", FORMULA, "--family", "binomial", "--json", "-", "--quiet", "--site-column",
               "region", one)
    assert a.exit_code == 0, a.stderr
    assert b.exit_code == 0, b.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["nsites"] == jb["nsites"] == 4
    assert ja["fixef"].keys() == jb["fixef"].keys()
    for k in ja["fixef"]:
        assert ja["fixef"][k] == pytest.approx(jb["fixef"][k], abs=1e-8)
    assert ja["loglik"] == pytest.approx(jb["loglik"], abs=1e-8)
    # and the Python API on the same frames agrees
    res = fedglmm.fit(FORMULA, contra, family="binomial", site="region")
    np.testing.assert_allclose(res.fixef.to_numpy(), list(ja["fixef"].values()), atol=1e-8)


def test_fit_summary_and_json_file(tmp_path, contra):
    files = _split_files(contra, tmp_path)
    out = tmp_path / "fit.json"
    r = invoke("fit", "--formula", SMALL, "--family", "binomial", "--link", "probit", "--json", out, *files)
    assert r.exit_code == 0, r.stderr
    assert "Fixed effects:" in r.stdout and "probit" in r.stdout and "federated over 4 sites" in r.stdout
    data = json.loads(out.read_text())
    assert data["link"] == "probit" and data["nsites"] == 4
    assert r.stderr.strip() == f"wrote {out}"


def test_weights_and_offset_columns_from_files(tmp_path):
    """--weights and --offset name columns the files are read for (only the model's columns are read):
    the proportion fit with its trials as weights equals the cbind fit, and --offset COL equals offset(COL);
    the dispersion is in the JSON."""
    cbpp = pd.read_csv(os.path.join(os.path.dirname(__file__), "data", "cbpp.csv"))
    cbpp["prop"] = cbpp["incidence"] / cbpp["size"]
    cbpp["lsize"] = np.log(cbpp["size"])
    path = _write(cbpp, tmp_path / "cbpp.csv")
    _cli_equals_api(["-f", "prop ~ period + (1 | herd)", "--family", "binomial", "--weights", "size"], path,
                    fedglmm.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, family="binomial"))
    ref = fedglmm.fit("incidence ~ period + offset(lsize) + (1 | herd)", cbpp, family="negative_binomial")
    got = _cli_equals_api(["-f", "incidence ~ period + (1 | herd)", "--family", "nbinom2", "--offset", "lsize"],
                          path, ref)
    assert got["dispersion"]["theta"] == pytest.approx(ref.dispersion["theta"], rel=1e-8)


def _cli_equals_api(args: list, path: str, ref) -> dict:
    """`fedglmm fit ARGS --json - -q PATH` succeeds and its fixed effects equal the API fit ``ref`` (1e-8);
    returns the JSON."""
    r = invoke("fit", *args, "--json", "-", "-q", path)
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    np.testing.assert_allclose(list(got["fixef"].values()), ref.fixef.to_numpy(), rtol=0, atol=1e-8)
    return got


def test_fit_gaussian_ml_and_nagq(tmp_path, contra):
    path = _write(contra, tmp_path / "c.csv")
    r = invoke("fit", "-f", "age ~ urban + (1 | district)", "--ml", "--json", "-", "-q", "-s", "region", path)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "ML" and out["reml"] is False
    r = invoke("fit", "-f", SMALL, "--family", "binomial", "--nagq", 5, "--json", "-", "-q", "-s", "region", path)
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["nagq"] == 5 and out["method"] == "AGHQ(5)"


def test_progress_callback(monkeypatch):
    from fedglmm.cli import fit as cli_fit

    monkeypatch.setattr(cli_fit, "_stderr_is_terminal", lambda: True)
    with cli_fit._progress(False, "fit") as on_round:
        assert callable(on_round)
        on_round(1, "describe")
    with cli_fit._progress(True, "fit") as on_round:
        assert on_round is None
    monkeypatch.setattr(cli_fit, "_stderr_is_terminal", lambda: False)
    with cli_fit._progress(False, "fit") as on_round:
        assert on_round is None


# --- errors -----------------------------------------------------------------------------------------

def _case_files(tmp_path, contra, case):
    """(arguments after 'fit', expected exit code, fragment of the message) for a bad-input case."""
    small = contra[contra["district"] <= 20].copy()
    base = ["-f", SMALL, "--family", "binomial"]
    a, b = small[small["district"] <= 10].copy(), small[small["district"] > 10].copy()

    def two(x, y, kx="csv", ky="csv"):
        return [_write(x, tmp_path / f"siteA.{kx}"), _write(y, tmp_path / f"siteB.{ky}")]

    if case == "missing file":
        return base + [tmp_path / "nope.csv"], 1, "not found"
    if case == "empty file":
        (tmp_path / "empty.csv").write_text("")
        return base + [_write(a, tmp_path / "a.csv"), tmp_path / "empty.csv"], 1, "is empty"
    if case == "header only":
        (tmp_path / "head.csv").write_text(",".join(contra.columns) + "\n")
        return base + [tmp_path / "head.csv"], 1, "is empty"
    if case == "unknown extension":
        (tmp_path / "x.xlsx").write_text("a")
        return base + [tmp_path / "x.xlsx"], 1, "unknown file type"
    if case == "garbled file":
        (tmp_path / "g.csv.gz").write_bytes(b"\x00\x01not gzip")
        return base + [tmp_path / "g.csv.gz"], 1, "cannot read"
    if case == "unknown family":
        return ["-f", SMALL, "--family", "tweedie", *two(a, b)], 2, "unknown family 'tweedie'"
    if case == "unknown link":
        return ["-f", SMALL, "--family", "binomial", "--link", "log", *two(a, b)], 2, "link 'log'"
    if case == "unparsable formula":
        return ["-f", "use urban + (1 | district)", "--family", "binomial", *two(a, b)], 2, "formula"
    if case == "unparsable formula 2":
        return ["-f", "use ~ urban + (1 | )", "--family", "binomial", *two(a, b)], 2, "formula"
    if case == "missing values":
        b.loc[b.index[3], "age"] = np.nan
        return base + ["--na-action", "fail", *two(a, b)], 1, "missing value (first in line 5 of"
    if case == "non-numeric value":
        b["age"] = b["age"].astype(object)
        b.loc[b.index[4], "age"] = "abc"
        return base + two(a, b), 1, "'abc'"
    if case == "non-numeric value, one file":
        small["age"] = small["age"].astype(object)
        small.loc[small.index[4], "age"] = "n/a?"
        return ["-f", FORMULA, "--family", "binomial", _write(small, tmp_path / "one.csv")], 1, "age"
    if case == "binomial outcome 2":
        b.loc[b.index[2], "use"] = 2
        return base + two(a, b, "csv", "parquet"), 1, "0 or 1"
    if case == "negative poisson count":
        b.loc[b.index[2], "use"] = -1
        return ["-f", SMALL, "--family", "poisson", *two(a, b)], 1, "non-negative"
    if case == "unknown column":
        return ["-f", "use ~ urban + educ + (1 | district)", "--family", "binomial", *two(a, b)], 1, "'educ'"
    if case == "columns differ":
        return base + two(a, b.drop(columns=["woman"])), 1, "woman"
    if case == "group in two files":          # a level at two sites: fitted for binomial models, not these
        b.loc[b.index[:3], "district"] = 1
        return ["-f", "use ~ urban + (1 | district)", "--family", "negative_binomial", *two(a, b)], 1, "level '1'"
    if case == "files and site column":
        return base + ["--site-column", "region", *two(a, b)], 2, "--site-column"
    if case == "unknown site column":
        return base + ["--site-column", "hospital", _write(small, tmp_path / "one.csv")], 1, "hospital"
    if case == "nagq 0":
        return base + ["--nagq", 0, *two(a, b)], 2, "--nagq"
    if case == "no formula":
        return ["--family", "binomial", *two(a, b)], 2, "--formula"
    if case == "unknown option":
        return base + ["--bogus", *two(a, b)], 2, "--bogus"
    if case == "json folder missing":
        return base + ["--json", tmp_path / "no" / "x.json", *two(a, b)], 2, "does not exist"
    if case == "nagq with gaussian":
        return ["-f", "age ~ urban + (1 | district)", "--nagq", 3, *two(a, b)], 1, "nagq"
    raise AssertionError(case)


ERROR_CASES = [
    "missing file", "empty file", "header only", "unknown extension", "garbled file", "unknown family",
    "unknown link", "unparsable formula", "unparsable formula 2", "missing values", "non-numeric value",
    "non-numeric value, one file", "binomial outcome 2", "negative poisson count", "unknown column",
    "columns differ", "group in two files", "files and site column", "unknown site column", "nagq 0",
    "no formula", "unknown option", "json folder missing", "nagq with gaussian",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_is_one_line(tmp_path, contra, case):
    args, code, fragment = _case_files(tmp_path, contra, case)
    r = invoke("fit", *args)
    assert_clean_error(r, code, fragment)


@pytest.mark.parametrize("case", ["missing file", "unknown family", "non-numeric value", "group in two files"])
def test_bad_input_subprocess(tmp_path, contra, case):
    args, code, fragment = _case_files(tmp_path, contra, case)
    r = run_subprocess("fit", *args)
    assert_clean_error(r, code, fragment)


def test_internal_error_is_one_line(monkeypatch, tmp_path, contra):
    def boom(*args, **kwargs):
        raise RuntimeError("something broke\non two lines")

    monkeypatch.setattr("fedglmm.api.fit_request_on_data", boom)
    path = _write(contra, tmp_path / "c.csv")
    r = invoke("fit", "-f", SMALL, "--family", "binomial", "-s", "region", path)
    line = assert_clean_error(r, 3)
    assert line.startswith("error: internal error: RuntimeError: something broke on two lines")
    r = invoke("fit", "--debug", "-f", SMALL, "--family", "binomial", "-s", "region", path)
    assert isinstance(r.exception, RuntimeError)
    r = invoke("--debug", "fit", "-f", SMALL, "--family", "binomial", "-s", "region", path)
    assert isinstance(r.exception, RuntimeError)


def test_failed_json_write_prints_no_fit(monkeypatch, tmp_path, contra):
    path = _write(contra, tmp_path / "c.csv")

    def refuse(self, path=None, indent=2):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fedglmm.FitResult, "to_json", refuse)
    r = invoke("fit", "-f", SMALL, "--family", "binomial", "-s", "region", "--json", tmp_path / "o.json", path)
    assert_clean_error(r, 1, "Permission denied")


# --- README and CI agree ------------------------------------------------------------------------------

def test_readme_quick_start_matches_ci():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme, ci = root / "README.md", root / ".ci" / "run"
    if not readme.exists() or not ci.exists():
        pytest.skip("not a source checkout")
    text = readme.read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Quick start"
    block = text.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip()]
    assert len(commands) == 2, commands
    assert commands[0].rstrip().endswith("fedglmm demo")
    ci_lines = [line.strip() for line in ci.read_text().splitlines()]
    assert commands[1].strip() in ci_lines
    assert os.access(ci, os.X_OK)
