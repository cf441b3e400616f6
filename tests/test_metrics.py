"""ROC / AUC and classification metrics with Wilson intervals."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedglmm.metrics import auc, classification_metrics, roc_curve, wilson


def _pair_count(y, s):
    y, s = np.asarray(y), np.asarray(s, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    d = pos[:, None] - neg[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / (pos.size * neg.size)


def _wilson_closed(k, n, z=1.959963984540054):
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return c - h, c + h


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_pair_count_and_mann_whitney(seed, ties):
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.binomial(1, 0.3, n)
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s, 0)  # heavy ties, within and across classes
    a = auc(y, s)
    assert a == pytest.approx(_pair_count(y, s), abs=1e-12)
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert a == pytest.approx(u / (y.sum() * (n - y.sum())), abs=1e-12)


def test_auc_edge_values():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # hand count: 0.9 beats both negatives; each 0.5 beats 0.1 and ties 0.5 -> (2 + 1.5 + 1.5) / 6
    assert auc([0, 1, 1, 0, 1], [0.1, 0.5, 0.5, 0.5, 0.9]) == pytest.approx(5 / 6)
    # invariant under monotone transforms of the score
    rng = np.random.default_rng(1)
    y, s = rng.binomial(1, 0.5, 50), rng.normal(size=50)
    assert auc(y, np.exp(s)) == pytest.approx(auc(y, s))
    assert auc(y.astype(bool), s) == pytest.approx(auc(y, s))


def test_roc_curve_shape_and_ties():
    fpr, tpr, thr = roc_curve([0, 1, 1, 0, 1], [0.1, 0.5, 0.5, 0.5, 0.9])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.1])
    rng = np.random.default_rng(2)
    y, s = rng.binomial(1, 0.4, 300), np.round(rng.normal(size=300), 1)
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    assert len(thr) == len(np.unique(s)) + 1
    for f, t, c in zip(fpr[1:], tpr[1:], thr[1:]):  # each point is the rule score >= threshold
        assert t == pytest.approx(np.mean(s[y == 1] >= c))
        assert f == pytest.approx(np.mean(s[y == 0] >= c))


@pytest.mark.parametrize("y, s", [([1, 1], [0.1, 0.2]), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1]),
                                  ([0, 1], [0.1, np.nan])])
def test_roc_rejects_bad_input(y, s):
    with pytest.raises(ValueError):
        roc_curve(y, s)


def test_wilson_known_values():
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    lo, hi = wilson(0, 10)
    assert hi == pytest.approx(_wilson_closed(0, 10)[1])  # = z^2 / (n + z^2)
    assert hi == pytest.approx(1.959963984540054 ** 2 / (10 + 1.959963984540054 ** 2))
    assert all(np.isnan(wilson(0, 0)))
    with pytest.raises(ValueError):
        wilson(3, 2)


@pytest.mark.parametrize("k, n", [(1, 3), (8, 10), (17, 40), (250, 1000), (999, 1000)])
def test_wilson_closed_form_and_score_test_inversion(k, n):
    lo, hi = wilson(k, n)
    np.testing.assert_allclose((lo, hi), _wilson_closed(k, n), rtol=1e-12)
    # Wilson bounds are where the score statistic |p_hat - p| / sqrt(p(1-p)/n) equals z
    z = stats.norm.ppf(0.975)
    for p in (lo, hi):
        assert abs(k / n - p) / np.sqrt(p * (1 - p) / n) == pytest.approx(z)
    lo90, hi90 = wilson(k, n, level=0.90)
    assert lo < lo90 <= k / n <= hi90 < hi


def test_classification_metrics_counts_and_intervals():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
    p = np.array([.9, .8, .6, .4, .7, .2, .1, .3, .5, .5])
    m = classification_metrics(y, p)  # threshold 0.5 inclusive
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (4, 2, 3, 1)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(3 / 5)
    assert m["accuracy_ci"] == wilson(7, 10)
    assert m["precision_ci"] == wilson(4, 6)
    assert m["recall_ci"] == m["sensitivity_ci"] == wilson(4, 5)
    assert m["specificity_ci"] == wilson(3, 5)
    m = classification_metrics(y, p, threshold=0.95)  # nothing predicted positive
    assert m["tp"] == m["fp"] == 0 and np.isnan(m["precision"]) and all(np.isnan(m["precision_ci"]))
    assert m["specificity"] == 1.0
