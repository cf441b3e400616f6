"""Nothing impossible reported as converged: complete and quasi-complete separation, and a variance that
runs off to infinity, end as "not converged" naming the coefficient or variance; the command line exits
non-zero unless --allow-nonconvergence.  Fits whose estimates exist -- large effects included -- are not
flagged (every reference case is checked by the golden test)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.cli import app


def _data(seed=1, groups=30, size=12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{i}" for i in range(groups)], size)
    n = len(g)
    return pd.DataFrame({"x": rng.normal(size=n), "z": rng.normal(size=n), "g": g,
                         "lev": np.where(np.arange(n) % 10 == 0, "rare", "common"),
                         "b": np.repeat(rng.normal(0, 0.7, groups), size), "u": rng.uniform(size=n)})


def _sites(df: pd.DataFrame) -> dict:
    half = len(df) // 2
    return {"A": df.iloc[:half].reset_index(drop=True), "B": df.iloc[half:].reset_index(drop=True)}


def _not_converged(res, *names):
    assert res.converged is False
    msg = res.messages[0]
    assert msg.startswith("not converged: ")
    for name in names:
        assert f"'{name}'" in msg, msg
    return msg


@pytest.mark.parametrize("method", ["iterative", "hybrid"])
def test_complete_separation(method):
    df = _data()
    df["y"] = (df["x"] > 0).astype(int)                    # x predicts every outcome
    res = fedglmm.fit("y ~ x + z + (1 | g)", _sites(df), family="binomial", method=method)
    msg = _not_converged(res, "x")
    assert "separation" in msg and "'z'" not in msg and "'Intercept'" not in msg
    assert res.to_dict()["converged"] is False


@pytest.mark.parametrize("method", ["iterative", "hybrid"])
def test_quasi_complete_separation(method):
    """A factor level whose rows are all successes (the others mixed): only that coefficient runs off."""
    df = _data(seed=2)
    rng = np.random.default_rng(5)
    df["y"] = np.where(df["lev"] == "rare", 1, rng.binomial(1, 0.35, len(df)))
    res = fedglmm.fit("y ~ lev + z + (1 | g)", _sites(df), family="binomial", method=method)
    msg = _not_converged(res, "lev[T.rare]")
    assert "'z'" not in msg and "'Intercept'" not in msg


@pytest.mark.parametrize("case", ["complete", "quasi", "two factors"])
def test_one_site_separation_is_not_reported_as_a_fit(case):
    """All the rows at one site: the default method's fit is that site's own, checked in one round -- which
    reported separation as converged (x = 16550 for the first case, "boundary (singular) fit" its only
    message).  A site's own fit whose estimates run off is no fit: the rounds go on and name what runs off."""
    df = _data(seed=2 if case == "quasi" else 1)
    if case == "quasi":
        df["y"] = np.where(df["lev"] == "rare", 1, np.random.default_rng(5).binomial(1, 0.35, len(df)))
        formula, name = "y ~ lev + z + (1 | g)", "lev[T.rare]"
    else:
        df["y"] = (df["x"] > 0).astype(int)
        df["h"] = [f"h{int(g[1:]) // 5}" for g in df["g"]]
        formula, name = "y ~ x + z + (1 | g)" + (" + (1 | h)" if case == "two factors" else ""), "x"
    res = fedglmm.fit(formula, {"one": df}, family="binomial")
    msg = _not_converged(res, name)
    assert "'z'" not in msg and "'Intercept'" not in msg


@pytest.mark.parametrize("nsites", [1, 3])
def test_a_one_shot_estimate_that_runs_off_is_not_the_fit(nsites):
    """cbpp with no case in period 4: where the sites' order-2 sums carry the likelihood, the hybrid takes the
    one-shot fit of them as the estimate and checks it in one round -- which reported that quasi-complete
    separation as converged (period 4 at -23).  Such an estimate is no fit: the rounds go on and name it."""
    df = pd.read_csv(Path(__file__).parent / "data" / "cbpp.csv")
    df.loc[df["period"].astype(str) == "4", "incidence"] = 0
    codes = pd.factorize(df["herd"])[0] % nsites
    sites = {f"s{k}": d.reset_index(drop=True) for k, d in df.groupby(codes)}
    res = fedglmm.fit("cbind(incidence, size - incidence) ~ factor(period) + (1 | herd)", sites, family="binomial")
    msg = _not_converged(res, "C(period)[T.4]")
    assert "T.2" not in msg and "T.3" not in msg


def test_running_off_over_sites_ends_early_and_says_what():
    """46 rows, 8 events, 9 groups, a 6-level factor and a random slope (a draw of a sweep of simulated
    shapes): the intercept's SD runs off.  Over sites the iteration went on to its 60th round and ended
    with "no convergence within 60 rounds"; it now ends once the estimates are seen running off at three
    accepted points in a row (likelihood.drive), not converged, naming the variance -- as the fit of the
    pooled rows does."""
    from pathlib import Path

    df = pd.read_csv(Path(__file__).parent / "data" / "runaway_slope_factor.csv")
    sites = {f"s{k}": df[df.g % 3 == k].reset_index(drop=True) for k in range(3)}
    for method in ("hybrid", "iterative"):
        res = fedglmm.fit("y ~ x + x2 + z + f + (1 + x | g)", sites, family="binomial", method=method)
        msg = _not_converged(res)
        assert "standard deviation of 'Intercept' | g grows without bound" in msg
        assert res.rounds < 20


def test_quasi_separation_of_counts():
    """A poisson factor level with no event at all: its log-rate runs off to −∞."""
    df = _data(seed=3)
    rng = np.random.default_rng(6)
    df["y"] = np.where(df["lev"] == "rare", 0, rng.poisson(np.exp(0.5 + 0.3 * df["z"] + df["b"])))
    res = fedglmm.fit("y ~ lev + z + (1 | g)", _sites(df), family="poisson", method="iterative")
    _not_converged(res, "lev[T.rare]")


def test_a_variance_that_runs_off():
    """Every group all successes or all failures: the random-intercept variance has no finite maximum."""
    df = _data(seed=4)
    rng = np.random.default_rng(7)
    df["y"] = np.repeat(rng.binomial(1, 0.5, 30), 12)
    res = fedglmm.fit("y ~ z + (1 | g)", _sites(df), family="binomial", method="iterative")
    msg = _not_converged(res, "Intercept")
    assert "standard deviation of 'Intercept' | g grows without bound" in msg


def test_large_but_finite_effects_are_not_flagged():
    """A strong effect (odds ratio e^4 per unit) with overlap, and a large random-effect SD: converged."""
    df = _data(seed=8, groups=40, size=25)
    eta = -0.5 + 4.0 * df["x"] + 3.0 * df["b"] / 0.7
    df["y"] = (df["u"] < 1 / (1 + np.exp(-eta))).astype(int)
    res = fedglmm.fit("y ~ x + z + (1 | g)", _sites(df), family="binomial")
    assert res.converged and not any(m.startswith("not converged") for m in res.messages)
    assert 3.0 < res.fixef["x"] < 5.5


def test_a_correlation_drifting_at_a_zero_variance_is_not_a_runaway():
    """A random slope without intercept variation (the intercept's SD is 0 in truth; fit 0 of
    ``benchmarks/stress_methods.py --seed 5``): the intercept variance goes to zero, and its correlation with
    the slope, no longer determined, drifts along a flat ridge at constant variances until the gain per step
    is below the tolerance.  Nothing runs off: both methods end converged at the same log-likelihood (the
    undetermined correlation aside), not "not converged" (which both reported before: the drifting
    covariance looked like one that runs off)."""
    rng = np.random.default_rng(5)
    G = int(rng.integers(8, 80))
    g = np.repeat(np.arange(G), rng.integers(2, 60, G))
    n = g.size
    x1, x2, x3 = rng.normal(size=n), rng.binomial(1, 0.4, n), rng.uniform(-1, 2, n) * 100
    rng.normal(0, 0.0, G)                       # (the intercepts' draw, SD 0: the stream of the stress test's)
    b1 = rng.normal(0, 0.5, G)
    eta = -1.0 + 0.5 * x1 - 0.4 * x2 + 0.2 * x3 / 100 + b1[g] * x1
    df = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x1": x1, "x2": x2, "x3": x3, "g": g})
    k = int(rng.integers(1, 6))
    sites = {f"s{j}": df[df.g % k == j] for j in range(k)}
    fits = [fedglmm.fit("y ~ x1 + x2 + x3 + (1 + x1 | g)", sites, family="binomial", method=m)
            for m in ("iterative", "hybrid")]
    for res in fits:
        assert res.converged and not any(m.startswith("not converged") for m in res.messages), res.messages
        sd = np.sqrt(np.diag(np.asarray(res.cov_re, float)))
        assert sd[0] < 1e-2 * sd[1]           # the intercept's SD at zero beside the slope's
    # the log-likelihood is the same to within the stopping rule's 1e-6 (the ridge is flat)
    assert abs(fits[0].loglik - fits[1].loglik) < 1e-6


def _cli(*args):
    import contextlib
    import io

    from typer.main import get_command

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = get_command(app).main(list(map(str, args)), prog_name="fedglmm", standalone_mode=False)
    return code, out.getvalue(), err.getvalue()


def test_command_line_exit_code_and_json(tmp_path):
    df = _data()
    df["y"] = (df["x"] > 0).astype(int)
    for sid, frame in _sites(df).items():
        frame.to_csv(tmp_path / f"{sid}.csv", index=False)
    files = [tmp_path / "A.csv", tmp_path / "B.csv"]
    out = tmp_path / "fit.json"
    code, stdout, stderr = _cli("fit", "-f", "y ~ x + z + (1 | g)", "--family", "binomial", "--json", out,
                                *files)
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not converged: the estimate of 'x'"), stderr
    assert json.loads(out.read_text())["converged"] is False
    code, stdout, stderr = _cli("fit", "-f", "y ~ x + z + (1 | g)", "--family", "binomial", "--json", "-",
                                "--allow-nonconvergence", *files)
    assert code == 0 and json.loads(stdout)["converged"] is False
    code, stdout, _ = _cli("fit", "-f", "y ~ x + z + (1 | g)", "--family", "binomial", "--allow-nonconvergence",
                           *files)
    assert code == 0 and "NOT CONVERGED" in stdout and "not converged: the estimate of 'x'" in stdout
