"""What a site computes for the diagnostics round: residual aggregates, posterior means, a fingerprint.

Everything here runs on the site's own rows at the fitted point the coordinator sends, and returns only
aggregates whose size depends on the number of bins or groups, never on the number of rows.

**Residuals** (Dunn & Smyth 1996, J. Comput. Graph. Stat. 5(3): 236-244).  For row j with outcome y_j,
trials m_j and the conditional distribution F_j given the random effects, the randomized quantile
residual is u_j = F_j(y_j⁻) + V_j (F_j(y_j) − F_j(y_j⁻)), V_j ~ U(0, 1) (continuous families, gaussian
and Gamma: u_j = F_j(y_j)).  The
random effects in F_j are a draw b* from their posterior given the group's rows (exact for gaussian
models; for GLMMs an independence Metropolis-Hastings chain with a multivariate-t proposal at the Laplace
approximation, :data:`MH_STEPS` steps).  Then (y, b*) has the distribution of (y, b), so under the model
the u_j are independent and uniform, whatever the group sizes (the pivotal quantities of Yuan & Johnson
2012, Biometrics 68: 156-164); with the modes b̂ in place of a draw they are not, as b̂ is shrunk.  The
site sends

* ``u``: the counts of u in :data:`U_BINS` equal bins of (0, 1);
* ``draws``: n, Σ r*_j² and Σ Var(r*_j²), the Pearson residuals r* = (y/m − μ*)/sqrt(V(μ*)/m) at the
  draw, whose sum of squares has mean n under the model (the dispersion test; Var(r²) = E r⁴ − 1 from
  the family's kurtosis);
* ``pearson``: the counts of the Pearson residuals at the modes b̂ (lme4's scaled residuals) on the
  coordinator's grid, with n, Σ r and Σ r²;
* ``fitted``: per bin of the linear predictor at the modes (without offset), on the coordinator's grid:
  the count, Σ μ̂, Σ (y/m − μ̂) and Σ V(μ̂)/m (the binned residual plot of Gelman & Hill 2007, §5.6).

Each histogram is sent as ``cuts`` (the fine-bin boundaries kept) and the sums of the merged bins: a
bin with fewer than the site's ``min_cell`` rows is merged with its right neighbour (the last with its
left one), so no sent bin holds fewer rows (unless the site has fewer rows in all).

**Randomness, reproducible and the same for any split.**  Every random number is a counter-based hash
(splitmix64) of the request's seed, the group's label and, for a row, the row's rank within its group
when the group's rows are sorted by their content (outcome, trials, offset, covariates).  A group lives at
one site, so the pooled data and any split of them into sites draw the same b* for each group and the
same V for each row: the randomised aggregates summed over the sites equal those of the pooled data
exactly (given the same fitted point and the same merged bins), whatever the order of the rows.
(Identical rows of a group may swap their V, which changes nothing.)  A model without random effects
treats a site's rows as one group, so there this holds only for the pooled data itself.

**Posterior means** of each group's random effects: adaptive Gauss-Hermite quadrature with K nodes per
dimension centred at the mode and scaled by the Laplace curvature (gaussian: the exact conditional mean,
which is the mode).

**Fingerprint**: the row count and a keyed digest (HMAC-SHA-256 with a key that never leaves the site's
process) of the positions of the rows the model uses and of their sorted (outcome, trials): two fits of
the same rows and response give equal digests, and the digest reveals nothing that can be checked
against guesses.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

import numpy as np
from scipy import special, stats

from ..likelihood.linalg import chol, inv
from ..likelihood.quadrature import product_grid

U_BINS = 100
MH_STEPS = 40
T_DF = 4.0
_KEY = secrets.token_bytes(32)       # the fingerprint key: this process only


# --- counter-based random numbers ------------------------------------------------------------------
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (wrapping uint64 arithmetic)."""
    z = np.asarray(x, np.uint64) + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(keys: np.ndarray, stream: int, count: int = 1) -> np.ndarray:
    """(len(keys), count) uniforms in (0, 1), one sequence per key and stream."""
    k = _mix(np.asarray(keys, np.uint64) ^ _mix(np.full(1, stream, np.uint64)))
    c = _mix(k[:, None] ^ (np.arange(1, count + 1, dtype=np.uint64) * _GOLD)[None, :])
    return ((c >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def group_keys(levels, seed: int) -> np.ndarray:
    """One 64-bit key per group label (and the request's seed)."""
    s = str(int(seed)).encode()
    return np.array([int.from_bytes(hashlib.blake2b(s + b"\0" + str(lv).encode(), digest_size=8).digest(), "little")
                     for lv in levels], dtype=np.uint64)


def row_keys(d, gkeys: np.ndarray) -> np.ndarray:
    """One key per row: its group's key and its rank among the group's rows sorted by content."""
    cols = [d.y, d.trials, d.offset] + [d.X[:, k] for k in range(d.X.shape[1])]
    order = np.lexsort(tuple(reversed(cols)) + (d.group,))       # by group, then by content
    rank = np.empty(d.n, np.int64)
    starts = d.starts
    pos = np.arange(d.n) - np.repeat(starts, np.diff(np.r_[starts, d.n]))
    rank[order] = pos       # rows are sorted by group, so position within group after sorting = pos
    return _mix(gkeys[d.group] ^ _mix(rank.astype(np.uint64) + np.uint64(1)))


# --- binning ------------------------------------------------------------------------------------
def binned(index: np.ndarray, nbins: int, min_cell: int, values: dict | None = None) -> dict:
    """Counts (and sums of ``values``) per bin, bins below ``min_cell`` rows merged (see the module
    docstring): ``{"cuts": kept boundaries (1..nbins-1), "count": ..., name: sums}``."""
    count = np.bincount(index, minlength=nbins).astype(float)
    sums = {k: np.bincount(index, weights=v, minlength=nbins) for k, v in (values or {}).items()}
    if min_cell <= 0:
        cuts = np.arange(1, nbins, dtype=np.int64)
    else:
        cuts, acc = [], 0.0
        for b in range(nbins - 1):       # a loop over bins (at most a few hundred), not rows
            acc += count[b]
            if acc >= min_cell:
                cuts.append(b + 1)
                acc = 0.0
        if cuts and acc + count[-1] < min_cell:   # the remainder is too small: merge it into the last bin
            cuts.pop()
        cuts = np.asarray(cuts, np.int64)
    edges = np.r_[0, cuts, nbins]
    out = {"cuts": cuts, "count": np.add.reduceat(count, edges[:-1])}
    out.update({k: np.add.reduceat(v, edges[:-1]) for k, v in sums.items()})
    return out


def grid_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value on the grid ``edges`` with an open bin below and above: 0..len(edges)."""
    return np.searchsorted(np.asarray(edges, float), x, side="right")


# --- the fitted model at the site's rows -----------------------------------------------------------
def _psi(eng, point):
    """The dispersion coordinate ψ of φ = (β, θ, ψ) for families that have one (else None)."""
    return point[eng.p + eng.ntheta] if getattr(eng.family, "ndisp", 0) else None


def _state(d, eng, req):
    """Linear predictor without random effects η0, the random-effect design M (b = M-space effects),
    the modes and their posterior precision, on the internal scale of the request."""
    point = np.asarray(req["point"], float)
    if hasattr(eng, "value_grad"):                      # GLMM engine: u-space, b = Λu
        _, _, aux = eng.value_grad(point, grad=False)
        p, psi = eng.p, _psi(eng, point)
        eta0 = eng.X @ point[:p] + eng.off
        if eng.q == 0:
            return {"eta0": eta0, "M": np.zeros((d.n, 0)), "mode": np.zeros((1, 0)), "L": None, "psi": psi}
        M = eng.Z @ aux["lam"]
        return {"eta0": eta0, "M": M, "mode": aux["u"], "L": aux["L"], "psi": psi}
    beta = np.asarray(req["beta_internal"], float)       # gaussian: b̃ ~ N(b̂, σ² K) exactly
    X = d.X @ np.asarray(req["transform"], float)
    zs = np.asarray(req.get("zscale", np.ones(0)), float)
    Z = d.Z / (zs if len(zs) else 1.0)
    eta0 = X @ beta + d.offset
    if Z.shape[1] == 0:
        return {"eta0": eta0, "M": Z, "mode": np.zeros((1, 0)), "L": None}
    sigma = float(req["sigma"])
    lam = eng.lam(point)
    sig = lam @ lam.T
    K = np.linalg.solve((np.eye(eng.q) + eng.P @ sig).transpose(0, 2, 1), sig)
    K = 0.5 * (K + K.transpose(0, 2, 1))
    mode = np.einsum("gab,gb->ga", K, eng.r - eng.Q @ beta)
    cov = sigma ** 2 * K
    return {"eta0": eta0, "M": Z, "mode": mode, "cov": cov}


def _draw(d, eng, family, st, keys) -> np.ndarray:
    """One posterior draw of each group's effects (in the space of ``st["M"]``)."""
    q = st["M"].shape[1]
    if q == 0:
        return st["mode"]
    if "cov" in st:                                       # gaussian: exact
        z = special.ndtri(uniforms(keys, 1, q))
        lam, vec = np.linalg.eigh(st["cov"])              # a square root that a singular fit's (PSD) covariance has
        root = vec * np.sqrt(np.maximum(lam, 0.0))[:, None, :]
        return st["mode"] + np.einsum("gab,gb->ga", root, z)
    return _mh_draw(d, eng, st, keys)


def _mh_draw(d, eng, st, keys) -> np.ndarray:
    """Independence Metropolis-Hastings from a t(ν) proposal at the mode with the Laplace scale."""
    q, mode, L = st["M"].shape[1], st["mode"], st["L"]
    Rinv = inv(L).transpose(0, 2, 1)                      # H = L Lᵀ, proposal scale L⁻ᵀ
    H = L @ L.transpose(0, 2, 1)

    def logpost(u):
        eta = st["eta0"] + np.einsum("jc,jc->j", st["M"], u[d.group])
        return eng._gsum(_loglik(eng.family, eng.y, eng.m, eta, st["psi"])) - 0.5 * np.sum(u * u, axis=1)

    def logprop(u):
        dlt = u - mode
        return -0.5 * (T_DF + q) * np.log1p(np.einsum("ga,gab,gb->g", dlt, H, dlt) / T_DF)

    nu = int(T_DF)
    draws = uniforms(keys, 2, MH_STEPS * (q + nu + 1)).reshape(len(keys), MH_STEPS, q + nu + 1)
    cur = mode.copy()
    lp_cur = logpost(cur) - logprop(cur)
    for s in range(MH_STEPS):
        z = special.ndtri(draws[:, s, :q])
        chi = np.sum(special.ndtri(draws[:, s, q:q + nu]) ** 2, axis=1)
        prop = mode + np.einsum("gab,gb->ga", Rinv, z) / np.sqrt(chi / T_DF)[:, None]
        lp = logpost(prop) - logprop(prop)
        with np.errstate(over="ignore", invalid="ignore"):
            accept = np.log(draws[:, s, -1]) < lp - lp_cur
        accept &= np.isfinite(lp)
        cur = np.where(accept[:, None], prop, cur)
        lp_cur = np.where(accept, lp, lp_cur)
    return cur


def _loglik(family, y, m, eta, psi):
    return family.loglik(y, m, eta) if psi is None else family.loglik(y, m, eta, psi)


def _moments(family, y, m, mu, scale):
    """Per row: the variance of the outcome at the mean μ and E[r⁴] of its Pearson residual.  ``scale``: σ
    (gaussian), ϑ (negative binomial), ν (Gamma shape).  The outcome is y/m for the binomial (V(μ)/m); for
    the others m is a prior weight: gaussian σ²/m (precision weights), poisson, negative binomial, Gamma
    V(μ) (their weights multiply a row's log-likelihood, not its distribution)."""
    if family.name == "gaussian":
        return scale ** 2 / m * np.ones_like(mu), np.full_like(mu, 3.0)
    if family.name == "poisson":
        return mu, 3.0 + 1.0 / np.maximum(mu, 1e-300)
    if family.name == "negative_binomial":
        mu = np.maximum(mu, 1e-300)
        return mu + mu * mu / scale, 3.0 + 6.0 / scale + scale / (mu * (mu + scale))
    if family.name == "gamma":
        return mu * mu / scale, np.full_like(mu, 3.0 + 6.0 / scale)
    pq = np.maximum(mu * (1.0 - mu), 1e-300)
    return pq / m, 3.0 + (1.0 - 6.0 * pq) / (m * pq)


def _quantile_residual(family, y, m, mu, scale, v):
    if family.name == "gaussian":
        return special.ndtr(np.sqrt(m) * (y - mu) / scale)
    if family.name == "gamma":
        return stats.gamma.cdf(y, scale, scale=mu / scale)
    if family.name == "poisson":
        lo, hi = stats.poisson.cdf(y - 1, mu), stats.poisson.cdf(y, mu)
    elif family.name == "negative_binomial":
        p = scale / (scale + mu)
        lo, hi = stats.nbinom.cdf(y - 1, scale, p), stats.nbinom.cdf(y, scale, p)
    else:
        lo, hi = stats.binom.cdf(y - 1, m, mu), stats.binom.cdf(y, m, mu)
    return np.clip(lo + v * (hi - lo), 0.0, 1.0)


def _scale(family, req, st) -> float:
    """σ (gaussian), the dispersion ϑ = e^ψ (negative binomial) or shape ν = e^ψ (Gamma), else 1."""
    if family.name == "gaussian":
        return float(req["sigma"])
    psi = st.get("psi")
    return float(np.exp(psi)) if psi is not None else 1.0


def residuals(d, family, eng, req, min_cell: int) -> dict:
    """The binned residual aggregates of the module docstring, at the request's point."""
    st = _state(d, eng, req)
    sigma = _scale(family, req, st)
    y, m = np.asarray(d.y, float), np.asarray(d.trials, float)
    ym = y / m if family.name == "binomial" else y            # other families: m is a prior weight
    gkeys = group_keys(d.group_levels, req.get("seed", 0))
    rkeys = row_keys(d, gkeys)
    # at the modes (deterministic)
    eta = st["eta0"] + np.einsum("jc,jc->j", st["M"], st["mode"][d.group])
    mu = family.mean(eta)
    var, _ = _moments(family, y, m, mu, sigma)
    e = ym - mu
    r = e / np.sqrt(var)
    pedges = np.asarray(req["pearson_edges"], float)
    fedges = np.asarray(req["fitted_edges"], float)
    out = {"pearson": binned(grid_index(r, pedges), len(pedges) + 1, min_cell),
           "fitted": binned(grid_index(eta - d.offset, fedges), len(fedges) + 1, min_cell,
                            {"fit": mu, "res": e, "var": var})}
    out["pearson"].update({"n": float(d.n), "sum": float(r.sum()), "sumsq": float(r @ r)})
    # at a posterior draw (randomised, pivotal)
    b = _draw(d, eng, family, st, gkeys)
    eta_s = st["eta0"] + np.einsum("jc,jc->j", st["M"], b[d.group])
    mu_s = family.mean(eta_s)
    var_s, r4 = _moments(family, y, m, mu_s, sigma)
    rs2 = (ym - mu_s) ** 2 / var_s
    u = _quantile_residual(family, y, m, mu_s, sigma, uniforms(rkeys, 3)[:, 0])
    out["u"] = binned(np.minimum((u * U_BINS).astype(np.int64), U_BINS - 1), U_BINS, min_cell)
    out["draws"] = {"n": float(d.n), "sumsq": float(rs2.sum()), "var_sumsq": float(np.sum(r4 - 1.0))}
    return out


def posterior(eng, req) -> tuple[np.ndarray, np.ndarray]:
    """Each group's posterior means and SDs of its random effects on the internal scale (b̃ for Z̃)."""
    point = np.asarray(req["point"], float)
    if not hasattr(eng, "value_grad"):                     # gaussian: exact, the conditional modes
        return eng.modes(point, req["beta_internal"], req["sigma"])
    _, _, aux = eng.value_grad(point, grad=False)
    q, lam = eng.q, aux["lam"]
    zk, lw = product_grid(int(req.get("nodes") or 15), q)
    S = inv(aux["L"]).transpose(0, 2, 1)
    V = S @ zk.T                                                         # (G, q, K)
    M = eng.Z @ lam
    eta0 = eng.X @ point[:eng.p] + eng.off
    uk = aux["u"][:, None, :] + V.transpose(0, 2, 1)                     # (G, K, q)
    etak = eta0[:, None] + np.einsum("jc,jkc->jk", M, uk[eng.g])
    loglik = _loglik(eng.family, eng.y[:, None], eng.m[:, None], etak, _psi(eng, point))
    a = lw + 0.5 * np.sum(zk ** 2, axis=1) + eng._gsum(loglik) - 0.5 * np.sum(uk * uk, axis=2)
    w = np.exp(a - a.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    bk = uk @ lam.T                                                      # (G, K, q)
    mean = np.einsum("gk,gkc->gc", w, bk)
    var = np.einsum("gk,gkc->gc", w, (bk - mean[:, None, :]) ** 2)
    return mean, np.sqrt(np.maximum(var, 0.0))


def fingerprint(d, rows: np.ndarray) -> dict:
    """The row count and a keyed digest of the positions of the rows the model uses in the site's frame
    (``rows``) and of the sorted (outcome, trials) pairs: the same for every model of the same rows and
    response, whatever their covariates and grouping factors."""
    order = np.lexsort((d.trials, d.y))
    h = hmac.new(_KEY, digestmod=hashlib.sha256)
    h.update(np.ascontiguousarray(np.sort(np.asarray(rows, np.int64))).tobytes())
    h.update(np.ascontiguousarray(np.asarray(d.y, float)[order]).tobytes())
    h.update(np.ascontiguousarray(np.asarray(d.trials, float)[order]).tobytes())
    return {"n": int(d.n), "digest": h.hexdigest()[:32]}
