"""A factor of which each site holds one level (each hospital a site), with covariates of that level.

* a site's own fit leaves out the columns its others determine there (a hospital's own covariate is constant
  at its site): before, it sent coefficients of 1e10 and more for them;
* the moment estimate of the variance between the sites' intercepts is DerSimonian and Laird's where every
  fit has every column (closed form), and a meta-regression on the covariates where they were left out;
* on simulated multi-centre counts with two hospital covariates, 20 hospitals each a site, the hybrid now
  starts from those fits, and ends at the pooled fit's estimates to 1e-8.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:
    import fedglmm
except ImportError:      # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import fedglmm

from fedglmm.coordinator.between import _tau2
from fedglmm.model.families import get_family
from fedglmm.model.formula import parse_formula
from fedglmm.site.own_fit import short_fit

FORMULA = "y ~ time + trt + teach + size + (1 | patient) + (1 | hospital)"


def hospitals(seed: int, family: str = "poisson", H: int = 20) -> pd.DataFrame:
    """H hospitals of 25-59 patients with 2-6 visits; a teaching flag and a size per hospital."""
    rng = np.random.default_rng(seed)
    npat = rng.integers(25, 60, H)
    hosp = np.repeat(np.arange(H), npat)
    P = hosp.size
    visits = rng.integers(2, 7, P)
    pat = np.repeat(np.arange(P), visits)
    h = hosp[pat]
    time = np.concatenate([np.arange(v) for v in visits])
    teach, size = rng.binomial(1, 0.4, H), rng.normal(0.0, 1.0, H)
    trt = rng.binomial(1, 0.5, P)[pat]
    eta = -0.5 + 0.3 * time - 0.5 * trt + 0.6 * teach[h] + 0.3 * size[h] + rng.normal(0, 0.5, H)[h] \
        + rng.normal(0, 1.0, P)[pat]
    y = rng.poisson(np.exp(eta - 0.5)) if family == "poisson" else rng.binomial(1, 1.0 / (1.0 + np.exp(-eta)))
    return pd.DataFrame({"y": y, "time": time, "trt": trt, "teach": teach[h], "size": size[h], "patient": pat,
                         "hospital": h})


def test_own_fit_leaves_out_a_column_constant_at_the_site():
    df = hospitals(0)
    site = df[df.hospital == 3].reset_index(drop=True)
    res = short_fit(site, parse_formula("y ~ time + trt + teach + size + (1 | patient)"), get_family("poisson"),
                    "observed", "h3", rounds=4, stop=0.0)
    assert res["names"] == ["Intercept", "time", "trt"]
    assert np.all(np.isfinite(res["beta"])) and np.max(np.abs(res["beta"])) < 5.0
    assert np.asarray(res["info"]).shape == (4, 4)


def _fits(a, v, rows=None):
    """(b, V, M, e, c, loc) tuples of one-coefficient fits: intercepts a, variances v, rows of M (default 1)."""
    rows = np.ones((len(a), 1)) if rows is None else np.asarray(rows, float)
    return [(np.array([ak]), np.array([[vk]]), r[None, :], np.array([1.0]), np.array([1.0]), {})
            for ak, vk, r in zip(a, v, rows)]


def test_between_variance_is_dersimonian_laird_with_one_layout():
    rng = np.random.default_rng(5)
    a, v = rng.normal(0.3, 0.6, 12), rng.uniform(0.05, 0.4, 12)
    w = 1.0 / v
    q = float(w @ (a - w @ a / w.sum()) ** 2)
    dl = max(0.0, (q - 11) / (w.sum() - (w @ w) / w.sum()))
    assert dl > 0.1
    assert _tau2(_fits(a, v)) == pytest.approx(dl, rel=1e-10)


def test_between_variance_leaves_out_what_a_covariate_of_the_level_explains():
    """Intercepts that differ by a covariate's effect alone (no variance between the levels beyond the fits'
    own): the meta-regression finds none, DerSimonian and Laird's estimate without the covariate a lot."""
    c = np.linspace(-2.0, 2.0, 10)
    a = 0.5 + 1.5 * c + np.array([0.1, -0.1] * 5) * 0.3
    v = np.full(10, 0.04)
    assert _tau2(_fits(a, v)) > 1.0
    assert _tau2(_fits(a, v, np.c_[np.ones(10), c])) == 0.0


def test_hospital_covariates_one_hospital_per_site():
    """One draw (seed 1: 8 rounds before, 4 now); over seeds 0-9 the rounds went 64 -> 56 in all, the same
    model without the hospital covariates taking 45 (benchmarks/README.md)."""
    df = hospitals(1)
    sites = {f"h{h}": d.reset_index(drop=True) for h, d in df.groupby("hospital")}
    split = fedglmm.fit(FORMULA, sites, family="poisson")
    pooled = fedglmm.fit(FORMULA, df, family="poisson")
    assert split.rounds <= 6, split.rounds
    assert abs(split.loglik - pooled.loglik) < 1e-8 * abs(pooled.loglik)
    assert np.allclose(split.fixef, pooled.fixef, rtol=1e-7, atol=1e-8)
    assert np.allclose([r["sd"] for r in split.random], [r["sd"] for r in pooled.random], rtol=1e-7, atol=1e-8)


def _one_level_per_site(name: str) -> tuple:
    """A held-out case of benchmarks/rounds_heldout.py (one grouping factor) pooled and split one group a site."""
    row = next(line.split("\t") for line in (Path(__file__).parent / "data" / "heldout" / "rounds" / "cases.tsv")
               .read_text().splitlines() if line.startswith(name + "\t"))
    df = pd.read_csv(Path(__file__).parent / "data" / "heldout" / "rounds" / f"{row[1]}.csv")
    group = parse_formula(row[2]).group
    return row[2], row[3], df, {str(k): d.reset_index(drop=True) for k, d in df.groupby(group, sort=False)}


def test_a_site_of_one_level_sends_its_fit_without_the_random_intercept():
    """Among other sites, a site holding one level of the model's one grouping factor fits its rows without
    the random intercept (its level's effect in the intercept) and says so; that is the GLM of its rows."""
    from fedglmm.site.summaries import summarize, to_jsonable

    formula, family, _, sites = _one_level_per_site("sim_pois_huge")
    one = next(iter(sites.values()))
    msg = summarize(one, formula, family, None, "A", order=2, local={"nagq": 1, "curvature": "observed", "sites": 50})
    loc = msg["local"]
    glm = fedglmm.fit(formula.split("+ (")[0], one, family=family)
    assert loc["alone"] == ["g"] and loc["levels"] == {"g": 1} and loc["theta"][0] == 0.0
    assert np.allclose(loc["beta"], glm.fixef.to_numpy(), rtol=0, atol=1e-6)
    assert "without the random intercept" in to_jsonable(msg)["about"]["local"]     # what the steward reads
    alone = summarize(one, formula, family, None, "A", order=2, local={"nagq": 1, "curvature": "observed"})
    assert "alone" not in (alone.get("local") or {})            # the only site: its own fit is the fit
    # a fit of one group is that group's summary: not from a group under the site's minimum size (epil: one
    # patient of 4 visits a site), whose own summaries stay too
    formula, family, _, sites = _one_level_per_site("epil_pois_la")
    msg = summarize(next(iter(sites.values())), formula, family, None, "A", order=2,
                    local={"nagq": 1, "curvature": "observed", "sites": 59})
    assert msg["groups"] is None and "alone" not in (msg.get("local") or {})


def test_one_group_a_site_starts_from_the_sites_fits_between_them():
    """sim_pois_huge (50 groups) split one group a site: the start of the intercepts' variance between the
    sites and the fixed effects of the meta-analysis (coordinator.between.one_level_start) beside the
    pseudo-data fit's: 4 rounds (5 before), the pooled fit to 1e-8."""
    formula, family, df, sites = _one_level_per_site("sim_pois_huge")
    split = fedglmm.fit(formula, sites, family=family)
    pooled = fedglmm.fit(formula, df, family=family)
    assert split.rounds <= 4, split.rounds
    assert abs(split.loglik - pooled.loglik) < 1e-8 * abs(pooled.loglik)
    assert np.allclose(split.fixef, pooled.fixef, rtol=1e-7, atol=1e-8)
