"""The hybrid's pooled block for small groups (site/pooled.py, coordinator/pseudo/pooled.py).

The bins are checked against an independent pandas computation of the same rule (sizes, counts, merging,
sums); the disclosure rules (min groups per bin, a size of one count left out, most small groups binned)
on data made to break them; the pseudo-groups against the bins' counts and group-level columns; and the
hybrid with the bins against the iterative fit (1e-8) on a simulated binary follow-up whose every group is
small, in at most 4 rounds."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.coordinator.pseudo.pooled import generate_pooled
from fedglmm.errors import InputError
from fedglmm.site.summaries import summarize

FORMULA = "y ~ trt * time + (1 | id)"
LOCAL = {"nagq": 1, "curvature": "observed"}


def follow_up(seed: int, subjects: int = 240, visits: int = 6, sd: float = 3.0, sites: int = 3,
              counts: bool = False) -> pd.DataFrame:
    """A binary follow-up (``counts``: poisson counts): subjects x visits (some missed), treatment per
    subject, SD ``sd``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(subjects):
        b, trt = rng.normal(0, sd), int(rng.random() < 0.5)
        t = np.arange(visits, dtype=float)
        t = t[rng.random(visits) > 0.12] if visits > 2 else t
        eta = -1.0 + b - 0.3 * t - 0.4 * trt * t
        y = rng.poisson(np.exp(eta + 1.5)) if counts else (rng.random(len(t)) < 1 / (1 + np.exp(-eta))).astype(int)
        rows.append(pd.DataFrame({"id": f"p{i:03d}", "trt": trt, "time": t, "y": y, "site": i % sites}))
    return pd.concat(rows, ignore_index=True)


def expected_bins(df: pd.DataFrame, min_groups: int) -> list[dict]:
    """The binning rule written out in pandas (the module docstring of site/pooled.py)."""
    df = df.assign(**{"trt:time": df.trt * df.time})
    cols = ["y", "trt", "time", "trt:time"]
    g = df.groupby("id", sort=True)
    size, count = g.size(), g["y"].sum()
    dim = len(cols)
    floor = max(min_groups, math.ceil(2 * (3 * dim - 1) / dim))
    out = []
    for n in sorted(size.unique()):
        ids = count[size == n].sort_values(kind="stable")
        groups, cur = [], []
        for c in sorted(ids.unique()):
            cur += list(ids.index[ids == c])
            if len(cur) >= floor and len(cur) * n >= 2 * (dim + dim * (dim + 1) / 2) / dim:
                groups.append(cur)
                cur = []
        if not groups or ids.nunique() == 1:
            continue
        if cur:
            groups[-1] += cur
        for b in groups:
            rows = df[df.id.isin(b)][cols].to_numpy(float)
            means = df[df.id.isin(b)].groupby("id")[cols].mean().to_numpy()
            out.append({"size": n, "k": len(b), "s1": rows.sum(0), "s2": rows.T @ rows,
                        "bd": (means ** 2).sum(0), "by": (means * means[:, [0]]).sum(0)})
    return out


def test_the_bins_are_the_rule_written_out():
    df = follow_up(1).query("site == 0").drop(columns="site")
    msg = summarize(df, FORMULA, "binomial", None, "A", order=2, local=LOCAL, min_pooled=5)
    got, want = msg["pooled"], expected_bins(df, 5)
    assert got["variables"] == ["(outcome)", "trt", "time", "trt:time"]
    assert len(got["k"]) == len(want) > 3
    for b, w in enumerate(want):
        assert got["size"][b] == w["size"] and got["k"][b] == w["k"]
        for key in ("s1", "s2", "bd", "by"):
            assert np.allclose(got[key][b], w[key], rtol=1e-12, atol=1e-9), key
    assert np.min(got["k"]) >= 6                    # ⌈2(3d − 1)/d⌉ = 6 for d = 4 variables


def test_min_pooled_sets_the_smallest_bin_and_zero_sends_none():
    df = follow_up(2).query("site == 1").drop(columns="site")
    wide = summarize(df, FORMULA, "binomial", None, "A", order=2, local=LOCAL, min_pooled=12)
    assert np.min(wide["pooled"]["k"]) >= 12
    assert summarize(df, FORMULA, "binomial", None, "A", order=2, local=LOCAL, min_pooled=0).get("pooled") is None
    # not for the one-shot method (no own-fit request), nor for a family with a dispersion parameter
    assert summarize(df, FORMULA, "binomial", None, "A", order=2).get("pooled") is None
    assert summarize(df, FORMULA, "negative_binomial", None, "A", order=2, local=LOCAL).get("pooled") is None


def test_a_size_whose_groups_share_one_count_is_not_sent():
    df = follow_up(3, subjects=120, sites=1).drop(columns="site")
    short = df.groupby("id")["time"].transform("size") == 4
    df.loc[short, "y"] = 0                               # every group of 4 visits: no positive visit
    msg = summarize(df, FORMULA, "binomial", None, "A", order=2, local=LOCAL)
    assert short.any() and 4.0 not in set(msg["pooled"]["size"])


def _groups_of_many_sizes(seed: int, per_size: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = np.repeat(np.arange(2, 10), per_size)          # 3 groups of each size: no bin of 6 of one size
    return pd.DataFrame({"id": np.repeat([f"g{i:02d}" for i in range(len(sizes))], sizes),
                         "trt": np.repeat(np.arange(len(sizes)) % 2, sizes), "time": rng.normal(size=sizes.sum()),
                         "y": rng.integers(0, 2, sizes.sum())})


def test_groups_of_many_sizes_go_in_bins_of_neighbouring_sizes():
    """Where bins of one size would hold under 80 % of the small groups: classes of consecutive sizes of at
    least 12 groups (2 x the least bin), each sorted by share of positive rows and cut into bins of 6."""
    df = _groups_of_many_sizes(4)
    got = summarize(df, FORMULA, "binomial", None, "A", order=2, local=LOCAL)["pooled"]
    g = df.assign(**{"trt:time": df.trt * df.time}).groupby("id", sort=True)
    size, share = g.size(), g["y"].sum() / g.size()
    want = []
    for lo, hi in ((2, 5), (6, 9)):                        # 12 groups each
        ids = share[(size >= lo) & (size <= hi)]
        ids = ids.sort_values(kind="stable")
        bins, cur = [], []
        for v in np.unique(ids.to_numpy()):
            cur += list(ids.index[ids == v])
            if len(cur) >= 6:
                bins.append(cur)
                cur = []
        if cur:
            bins[-1] += cur
        want += bins
    cols = ["y", "trt", "time", "trt:time"]
    frame = df.assign(**{"trt:time": df.trt * df.time})
    assert len(got["k"]) == len(want)
    for b, ids in enumerate(want):
        rows = frame[frame.id.isin(ids)][cols].to_numpy(float)
        assert got["k"][b] == len(ids) and got["rows"][b] == len(rows)
        assert got["size"][b] == pytest.approx(len(rows) / len(ids))
        assert np.allclose(got["s1"][b], rows.sum(0)) and np.allclose(got["s2"][b], rows.T @ rows)


def test_no_bins_for_too_few_small_groups_or_one_share():
    few = _groups_of_many_sizes(5, per_size=1)             # 8 small groups: no class of 12
    assert summarize(few, FORMULA, "binomial", None, "A", order=2, local=LOCAL).get("pooled") is None
    same = _groups_of_many_sizes(6).assign(y=0)            # every group without a positive row
    assert summarize(same, FORMULA, "binomial", None, "A", order=2, local=LOCAL).get("pooled") is None


@pytest.mark.parametrize("value", [1, 2, -1, 2.5])
def test_min_pooled_must_be_zero_or_at_least_three(value):
    with pytest.raises(InputError, match="min_pooled"):
        fedglmm.SiteConfig(min_pooled=value)


def test_pseudo_groups_keep_counts_sizes_and_group_level_columns():
    df = follow_up(5).query("site == 2").drop(columns="site")
    bins = summarize(df, FORMULA, "binomial", None, "A", order=2, local=LOCAL)["pooled"]
    V, gidx = generate_pooled(bins, np.random.default_rng(0))
    start = 0
    for b in range(len(bins["k"])):
        k, n = int(bins["k"][b]), int(bins["size"][b])
        rows = V[np.isin(gidx, np.arange(start, start + k))]
        assert len(rows) == k * n
        groups = rows.reshape(k, n, -1)
        # treatment (group-level, 0/1): constant within each pseudo-group, in the bin's share of groups
        assert np.all(groups[:, :, 1] == groups[:, :1, 1]) and set(np.unique(groups[:, 0, 1])) <= {0.0, 1.0}
        assert groups[:, 0, 1].sum() == round(bins["s1"][b][1] / n)
        counts = groups[:, :, 0].sum(axis=1)
        if bins["bd"][b][0] * k == pytest.approx(bins["s1"][b][0] ** 2 / n ** 2, rel=1e-12):
            assert np.all(counts == bins["s1"][b][0] / k)   # a bin of one count: that count in every group
        assert abs(counts.sum() - bins["s1"][b][0]) <= k / 2 + 1
        start += k


def test_hybrid_with_the_bins_matches_iterative_in_at_most_four_rounds():
    df = follow_up(6)
    sites = {f"s{j}": part.drop(columns="site") for j, part in df.groupby("site")}
    hyb = fedglmm.fit(FORMULA, sites, family="binomial")
    it = fedglmm.fit(FORMULA, sites, family="binomial", method="iterative")
    off = fedglmm.fit(FORMULA, sites, family="binomial", site_config=fedglmm.SiteConfig(min_pooled=0))
    assert hyb.converged and hyb.rounds <= 4, hyb.rounds
    for other in (it, off):
        assert np.allclose(hyb.fixef, other.fixef, atol=1e-8) and np.allclose(hyb.theta, other.theta, atol=1e-8)
        assert abs(hyb.loglik - other.loglik) < 1e-8 * abs(other.loglik)
    assert "went only pooled in bins" in hyb.messages[0] and "pooled" not in off.messages[0]


def test_row_level_binaries_and_factor_levels_stay_binary_and_exclusive():
    """A row-level 0/1 column is drawn per row given its outcome, with the bin's shares; the levels of a
    row-level factor never together."""
    rng = np.random.default_rng(9)
    df = follow_up(9, subjects=240, sites=1).drop(columns="site")
    df["late"] = (df.time >= 3).astype(int)
    df["arm"] = rng.choice(["a", "b", "c"], size=len(df))
    formula = "y ~ trt + late + arm + (1 | id)"
    bins = summarize(df, formula, "binomial", None, "A", order=2, local=LOCAL)["pooled"]
    names = bins["variables"]
    V, _ = generate_pooled(bins, np.random.default_rng(1))
    late, a, b, c = (names.index(n) for n in ("late", "arm[T.a]", "arm[T.b]", "arm[T.c]"))
    assert set(np.unique(V[:, [late, a, b, c]])) <= {0.0, 1.0}
    # the site codes every level it has (against a level no row has): one level per row, as in the data
    assert np.all(V[:, a] + V[:, b] + V[:, c] == 1.0)
    y = V[:, 0] == 1
    s1, s2 = bins["s1"].sum(0), bins["s2"].sum(0)
    for j in (late, b):
        want1, want0 = s2[j, 0] / s1[0], (s1[j] - s2[j, 0]) / (bins["rows"].sum() - s1[0])
        assert abs(V[y, j].mean() - want1) < 0.06 and abs(V[~y, j].mean() - want0) < 0.06


@pytest.mark.parametrize("n,a,b", [(7, 0.3, 0.5), (5, 2.0, 1.0), (30, 0.1, 0.2), (2, 50.0, 3.0)])
def test_beta_binomial_quantiles_are_scipys(n, a, b):
    from scipy.stats import betabinom

    from fedglmm.coordinator.pseudo.pooled import _betabinom_quantiles

    q = (np.arange(17) + 0.5) / 17
    assert np.array_equal(_betabinom_quantiles(q, n, a, b), betabinom.ppf(q, n, a, b))


def test_count_bins_are_the_rule_written_out():
    """A poisson outcome's small groups: bins by (size, the group's total count), as for 0/1 outcomes."""
    df = follow_up(11, sd=0.7, counts=True).query("site == 0").drop(columns="site")
    got, want = summarize(df, FORMULA, "poisson", None, "A", order=2, local=LOCAL)["pooled"], expected_bins(df, 5)
    assert len(got["k"]) == len(want) > 2 and df.y.max() > 3
    for b, w in enumerate(want):
        assert got["size"][b] == w["size"] and got["k"][b] == w["k"]
        for key in ("s1", "s2", "bd", "by"):
            assert np.allclose(got[key][b], w[key], rtol=1e-12, atol=1e-9), key


def test_counts_of_many_sizes_send_no_bins_of_neighbouring_sizes():
    """Counts: bins of one size only (a bin of neighbouring sizes misshaped the start of grouseticks)."""
    df = _groups_of_many_sizes(4).assign(y=lambda f: np.random.default_rng(3).poisson(3.0, len(f)))
    assert summarize(df, FORMULA, "poisson", None, "A", order=2, local=LOCAL).get("pooled") is None
    # the family decides, not the values a site happens to hold: rare counts, all 0 or 1 here, are counts
    rare = _groups_of_many_sizes(4)
    assert set(rare.y) == {0, 1}
    assert summarize(rare, FORMULA, "poisson", None, "A", order=2, local=LOCAL).get("pooled") is None
    assert summarize(rare, FORMULA, "binomial", None, "A", order=2, local=LOCAL).get("pooled") is not None


@pytest.mark.parametrize("n,mean,spread", [(4, 1.5, 0.8), (6, 0.3, 0.4), (3, 7.0, 3.0), (10, 2.0, 0.2)])
def test_count_totals_are_the_negative_binomials_quantiles(n, mean, spread):
    """Group totals with mean n·mean and SD n·spread: the negative binomial's quantiles (scipy's) where that
    variance exceeds the poisson's, else a rounded normal with that mean and SD."""
    from scipy.stats import nbinom

    from fedglmm.coordinator.pseudo.pooled import _totals

    k = 15
    got = _totals(n, k, mean, spread)
    m, var = n * mean, (n * spread) ** 2
    if var > m:
        r = m * m / (var - m)
        assert np.array_equal(got, nbinom.ppf((np.arange(k) + 0.5) / k, r, r / (r + m)))
    else:
        assert np.all(got >= 0) and abs(got.mean() - m) <= 0.5 and abs(got.std() - n * spread) < 0.5 + 0.1 * m


def test_count_pseudo_groups_keep_totals_and_group_level_columns():
    df = follow_up(12, sd=0.7, counts=True).query("site == 1").drop(columns="site")
    bins = summarize(df, FORMULA, "poisson", None, "A", order=2, local=LOCAL)["pooled"]
    V, gidx = generate_pooled(bins, np.random.default_rng(0), counts=True)
    start = 0
    for b in range(len(bins["k"])):
        k, n = int(bins["k"][b]), int(bins["size"][b])
        groups = V[np.isin(gidx, np.arange(start, start + k))].reshape(k, n, -1)
        y = groups[:, :, 0]
        assert np.all(y >= 0) and np.array_equal(y, np.round(y))           # counts
        assert np.all(groups[:, :, 1] == groups[:, :1, 1])                  # treatment: per group
        totals = y.sum(axis=1)
        mu = bins["s1"][b][0] / bins["rows"][b]
        assert abs(totals.mean() - n * mu) <= 0.5 + 0.05 * n * mu           # the bin's mean total
        sd = n * np.sqrt(max(bins["bd"][b][0] / k - mu * mu, 0.0))
        assert abs(totals.std() - sd) <= 0.35 * sd + 0.5                    # and about its spread
        start += k


def test_hybrid_with_count_bins_matches_iterative():
    df = follow_up(13, subjects=150, sd=0.7, counts=True)
    sites = {f"s{j}": part.drop(columns="site") for j, part in df.groupby("site")}
    hyb = fedglmm.fit(FORMULA, sites, family="poisson")
    it = fedglmm.fit(FORMULA, sites, family="poisson", method="iterative")
    assert hyb.converged and hyb.rounds <= 4, hyb.rounds
    assert np.allclose(hyb.fixef, it.fixef, atol=1e-8) and np.allclose(hyb.theta, it.theta, atol=1e-8)
    assert abs(hyb.loglik - it.loglik) < 1e-8 * abs(it.loglik)
    assert "went only pooled in bins" in hyb.messages[0]
