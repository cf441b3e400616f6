"""Pseudo-groups for a site's pooled small groups (:mod:`fedglmm.site.pooled`): per bin, ``k`` groups of
``size`` rows of a binary or count outcome whose pooled moments are close to the bin's.

Per bin of k groups and N rows, with μ the rows' mean of v = (outcome, variables), B_j = bd_j/k − μ_j² the
variance of the group means of variable j and B_jy = by_j/k − μ_j μ_y their covariance with the outcome's,
and W = s2/N − μμᵀ − B the within-group covariance of the rows (for two row-level variables their pooled
covariance, the between part of it not sent):

1. the groups' counts of positive rows: all ``round(size·μ_y)`` where B_yy is zero (a bin of one count),
   else the k quantiles of the beta-binomial with mean size·μ_y and variance size²·B_yy (U-shaped where
   the random effect is large, as the counts are), or of a normal where that variance is below the
   binomial's; on the follow-ups of ``benchmarks/follow_up_rounds.py`` the beta-binomial's quantiles gave
   better starts than the normal's (6 sites of 25 subjects, 8 seeds: 38 rounds in all -> 33);
   a count outcome's group totals (poisson) likewise: the quantiles of the negative binomial with mean
   size·μ_y and variance size²·B_yy, or of a normal where that variance is below the poisson's;
2. every other variable's group mean: μ, plus its regression on the group's outcome mean, plus a normal
   draw with the residual between-group variance (independent across variables).  A variable without
   within-group variance (W_jj = 0) is *group-level* and stays constant within each group; a group-level
   0/1 variable (a treatment) is 1 in the round(k·μ_j) groups with the largest drawn means, and 0
   elsewhere -- and never 1 beside an earlier 0/1 column it is never 1 with in the data (levels of one
   factor);
3. the rows: the group's count of ones, then zeros (a count's total split over its rows as a multinomial
   with equal shares); a row-level 0/1 variable drawn per row given its outcome y with probability the
   bin's linear regression of it on y (the levels of one factor as one categorical variable); each other
   row-level variable its group mean plus its within-group regression on the outcome under W, plus a
   normal draw with the residual within covariance.  A bin of neighbouring sizes gives every pseudo-group
   its mean size.

The draw matches the bins' moments approximately (the counts are rounded, the draws are not corrected),
which is all a start needs: these rows only shape the start and the step model of the hybrid, whose
Newton rounds then use every row of the real data."""
from __future__ import annotations

import numpy as np


def generate_pooled(bins: dict, rng: np.random.Generator, counts: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(V, group index) of the pseudo-groups of every bin; V's columns are ``bins['variables']``; ``counts``:
    the outcome is a count (poisson), not 0/1."""
    out, gidx, start = [], [], 0
    for b in range(len(bins["k"])):
        k, n = int(round(bins["k"][b])), max(int(round(bins["size"][b])), 1)
        V = _one_bin(n, k, float(bins["rows"][b]), np.asarray(bins["s1"][b], float), np.asarray(bins["s2"][b], float),
                     np.asarray(bins["bd"][b], float), np.asarray(bins["by"][b], float), rng, counts)
        out.append(V)
        gidx.append(start + np.repeat(np.arange(len(V) // n), n))
        start += len(V) // n
    return np.vstack(out), np.concatenate(gidx)


def _psd_root(S: np.ndarray) -> np.ndarray:
    lam, vec = np.linalg.eigh(0.5 * (S + S.T))
    return vec * np.sqrt(np.maximum(lam, 0.0))


def _one_bin(n: int, k: int, rows: float, s1, s2, bd, by, rng, poisson: bool = False) -> np.ndarray:
    mu = s1 / rows
    T = s2 / rows - np.outer(mu, mu)                        # the rows' covariance
    B = np.diag(bd / k - mu * mu)                           # the group means': variances and ...
    B[:, 0] = B[0, :] = by / k - mu * mu[0]                 # ... covariances with the outcome's
    W = T - B                                               # within groups (row-level pairs: approximately)
    dim = len(mu)
    # 1. counts
    spread = np.sqrt(max(B[0, 0], 0.0)) if B[0, 0] > 1e-12 else 0.0
    counts = rng.permutation(_totals(n, k, mu[0], spread) if poisson else _counts(n, k, mu[0], spread))
    ybar = counts / n
    # 2. group means of the other variables
    o = np.arange(1, dim)
    if spread > 0:
        beta = B[o, 0] / B[0, 0]
        R = B[np.ix_(o, o)] - np.outer(beta, beta) * B[0, 0]
    else:
        beta, R = np.zeros(dim - 1), B[np.ix_(o, o)]
    M = mu[o] + np.outer(ybar - mu[0], beta) + rng.standard_normal((k, dim - 1)) @ _psd_root(R).T
    glevel = np.diag(W)[o] <= 1e-9 * np.maximum(np.diag(T)[o], 1e-300)
    binary = (np.abs(np.diag(s2)[o] / rows - mu[o]) <= 1e-9 * np.maximum(np.abs(mu[o]), 1e-300)) \
        & (mu[o] >= 0) & (mu[o] <= 1)
    _binary_columns(M, np.flatnonzero(glevel & binary), mu[o], s2[np.ix_(o, o)], k, rng)
    # 3. rows
    y = rng.multinomial(counts.astype(np.int64), np.full(n, 1.0 / n)).astype(float) if poisson else \
        (np.arange(n)[None, :] < counts[:, None]).astype(float)                # (k, n)
    X = np.repeat(M[:, None, :], n, axis=1)                                     # (k, n, dim-1)
    _row_binaries(X, y, np.flatnonzero(~glevel & binary), s1, s2, rows, rng)
    rowlevel = np.flatnonzero(~glevel & ~binary)
    if len(rowlevel):
        r = o[rowlevel]
        wb = W[r, 0] / W[0, 0] if W[0, 0] > 1e-12 else np.zeros(len(r))
        E = W[np.ix_(r, r)] - np.outer(wb, wb) * W[0, 0]
        noise = rng.standard_normal((k, n, len(r))) @ _psd_root(E).T
        X[:, :, rowlevel] += (y - ybar[:, None])[:, :, None] * wb + noise
    return np.concatenate([y[:, :, None], X], axis=2).reshape(k * n, dim)


def _counts(n: int, k: int, p: float, spread: float) -> np.ndarray:
    """k counts of positive rows out of n with mean n·p and standard deviation about n·spread: the
    quantiles of the beta-binomial with that mean and variance where the spread exceeds the binomial's
    (a random effect's: U-shaped for a large one), else of a normal, rounded; within [0, n]."""
    if spread <= 0 or k < 2:
        return np.full(k, float(np.clip(np.round(n * p), 0, n)))
    q = (np.arange(k) + 0.5) / k
    var = (n * spread) ** 2
    binom = n * p * (1 - p)
    if n > 1 and 0 < p < 1 and var > binom:
        rho = min((var / binom - 1) / (n - 1), 1 - 1e-6)
        a = p * (1 / rho - 1)
        return _betabinom_quantiles(q, n, a, (1 - p) / p * a)
    return np.clip(np.round(n * (p + spread * _normal_scores(q))), 0, n)


def _normal_scores(q: np.ndarray) -> np.ndarray:
    """The standard normal's quantiles at ``q``, scaled to mean 0 and SD 1 exactly."""
    from scipy.special import ndtri      # on first use: a small fit need not load scipy.special

    z = ndtri(q)
    return (z - z.mean()) / z.std()


def _totals(n: int, k: int, mean: float, spread: float) -> np.ndarray:
    """k group totals of a count outcome over n rows with mean n·``mean`` and standard deviation about
    n·``spread``: the quantiles of the negative binomial with that mean and variance where it exceeds the
    poisson's (a random effect's), else of a normal, rounded and at least 0."""
    m, var = n * mean, (n * spread) ** 2
    q = (np.arange(k) + 0.5) / k
    if k >= 2 and 0 < m < 1e5 and var > m * (1 + 1e-6):
        from scipy.special import gammaln      # on first use: a small fit need not load scipy.special

        r = m * m / (var - m)
        top = int(np.ceil(m + 12 * np.sqrt(var) + 20))
        t = np.arange(top + 1)
        logp = gammaln(t + r) - gammaln(r) - gammaln(t + 1) + r * np.log(r / (r + m)) + t * np.log(m / (r + m))
        cdf = np.cumsum(np.exp(logp - logp.max()))
        return np.minimum(np.searchsorted(cdf / cdf[-1], q), top).astype(float)
    if spread <= 0 or k < 2:
        return np.full(k, float(max(np.round(m), 0.0)))
    return np.maximum(np.round(m + n * spread * _normal_scores(q)), 0.0)


def _row_binaries(X: np.ndarray, y: np.ndarray, cols: np.ndarray, s1, s2, rows: float, rng) -> None:
    """Row-level 0/1 columns in place (``cols`` index X's last axis; variable j + 1 of the sums): drawn
    per row given its outcome y, with P(x = 1 | y) the bin's linear regression of x on y (for a 0/1 outcome
    the shares Σxy / Σy and (Σx − Σxy) / (N − Σy)), within [0, 1]; columns never 1 together in the data
    (levels of one factor) drawn as one categorical variable."""
    sets = []
    for j in cols:
        for S in sets:
            if all(s2[j + 1, i + 1] <= 1e-12 * max(s2[j + 1, j + 1], 1e-300) for i in S):
                S.append(j)
                break
        else:
            sets.append([j])
    my = float(s1[0]) / rows
    vy = float(s2[0, 0]) / rows - my * my
    for S in sets:
        idx = np.array(S) + 1
        slope = (s2[idx, 0] / rows - s1[idx] / rows * my) / vy if vy > 1e-12 else np.zeros(len(S))
        p = np.clip(s1[idx] / rows + slope * (y[..., None] - my), 0, 1)        # (k, n, |S|)
        c = np.cumsum(p, axis=-1)
        c /= np.maximum(c[..., -1:], 1.0)                                      # shares summing past 1
        u = rng.random(y.shape)[..., None]
        hit = (u < c) & (u >= np.concatenate([np.zeros_like(c[..., :1]), c[..., :-1]], axis=-1))
        for t, j in enumerate(S):
            X[:, :, j] = hit[..., t]


def _betabinom_quantiles(q: np.ndarray, n: int, a: float, b: float) -> np.ndarray:
    """The beta-binomial(n, a, b)'s quantiles at ``q``, from its probabilities over 0..n (scipy.special:
    scipy.stats would take 0.3 s to import for this)."""
    from scipy.special import betaln, gammaln

    k = np.arange(n + 1)
    logp = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1) + betaln(k + a, n - k + b) - betaln(a, b)
    cdf = np.cumsum(np.exp(logp - logp.max()))
    return np.minimum(np.searchsorted(cdf / cdf[-1], q), n).astype(float)


def _binary_columns(M: np.ndarray, cols: np.ndarray, mu: np.ndarray, s2: np.ndarray, k: int, rng) -> None:
    """Group-level 0/1 columns in place: 1 in the round(k·μ) groups with the largest drawn means (ties
    broken at random), never beside an earlier 0/1 column it is never 1 with."""
    done = []
    for j in cols:
        busy = np.zeros(k, bool)
        for i in done:
            if s2[i, j] <= 1e-12 * max(s2[j, j], 1e-300):                        # never both 1
                busy |= M[:, i] == 1.0
        order = np.lexsort((rng.random(k), -M[:, j]))
        order = np.r_[order[~busy[order]], order[busy[order]]]
        ones = np.zeros(k)
        ones[order[:int(round(k * mu[j]))]] = 1.0
        M[:, j] = ones
        done.append(j)
