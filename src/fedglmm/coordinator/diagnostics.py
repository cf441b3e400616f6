"""The diagnostics round at the coordinator: the request, and what the sites' binned aggregates say.

The sites compute residuals on their own rows and send only binned sums (:mod:`fedglmm.site.diagnostics`);
here they are added up and turned into

* a **uniformity test** of the randomized quantile residuals: Pearson's χ² on the pooled bin counts,
  coarsened to at most 20 bins with at least 5 expected rows each (df = bins − 1);
* a **dispersion test** (binomial, poisson): with r* the Pearson residuals at a posterior draw of the random
  effects, Σ r*² has mean n and variance Σ (E r*⁴ − 1) under the model; z = (Σ r*² − n) / sd, two-sided
  normal p-value, and the ratio Σ r*² / n;
* the **quantiles of the scaled (Pearson) residuals** at the modes, lme4's "Scaled residuals", by linear
  interpolation within the pooled bins (the 1 % and 99 % quantiles stand for the minimum and maximum,
  which are single rows' values and are not sent);
* the **binned residuals against the fitted values** (about 20 bins of similar counts, with ±2 SE);
* the **QQ points** of the quantile residuals: the pooled distribution function at the bins' edges.

Sites merge small bins independently, so the pooled bins are the common coarsening: the boundaries that
every site kept.  Summed over sites they equal the pooled data's aggregates on that coarsening.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import special, stats

from ..model.spec import lambda_matrix, theta_index
from ..protocol import request

U_BINS = 100
PEARSON_EDGES = np.linspace(-6.0, 6.0, 241)
FITTED_BINS = 100


def inspect_request(session, what, seed: int = 0, nodes: int | None = None) -> dict:
    """The ``inspect`` request at the session's estimate."""
    st, est = session.setup, session.estimate
    extra = {"what": list(what), "point": session.point(), **st.scale, "seed": int(seed)}
    if session.gaussian:
        extra.update(beta_internal=np.asarray(est.gamma, float), sigma=float(np.sqrt(est.sigma2)))
    if nodes is not None:
        extra["nodes"] = int(nodes)
    if "residuals" in what:
        extra.update(pearson_edges=PEARSON_EDGES, fitted_edges=fitted_edges(session))
    return request("inspect", **extra)


def fitted_edges(session) -> np.ndarray:
    """A grid for the linear predictor (without offset): its mean ± 5 marginal SDs, from the pooled
    column moments, the fixed effects and the random-effect covariance."""
    st, est = session.setup, session.estimate
    beta = st.A @ np.asarray(est.gamma, float)
    n = st.n
    mean = float(st.sums["colsum"] @ beta / n)
    var = float(beta @ st.sums["xtx"] @ beta / n - mean ** 2)
    q = st.mask.shape[0]
    if q:
        lam = lambda_matrix(np.asarray(est.theta, float), q, theta_index(st.mask))
        scale2 = est.sigma2 if est.sigma2 is not None else 1.0
        var += float(scale2 * np.trace(lam @ lam.T @ (st.sums["ztz"] / np.outer(st.zs, st.zs))) / n)
    sd = np.sqrt(max(var, 0.0)) or 1.0
    return np.linspace(mean - 5.0 * sd, mean + 5.0 * sd, FITTED_BINS + 1)


def pool(parts: list[dict], nbins: int) -> dict:
    """Site histograms (``cuts`` and per-bin sums) on their common coarsening: ``{"cuts", sums...}``."""
    common = set(range(1, nbins))
    for p in parts:
        common &= set(np.asarray(p["cuts"], np.int64).tolist())
    cuts = np.array(sorted(common), np.int64)
    keys = [k for k in parts[0] if k != "cuts" and np.ndim(parts[0][k]) == 1]
    out = {"cuts": cuts, **{k: np.zeros(len(cuts) + 1) for k in keys}}
    for p in parts:
        left = np.r_[0, np.asarray(p["cuts"], np.int64)]
        idx = np.searchsorted(cuts, left, side="right")
        for k in keys:
            np.add.at(out[k], idx, np.asarray(p[k], float))
    return out


@dataclass
class Diagnostics:
    """The pooled residual aggregates of a fit and the tests and plots made of them."""

    family: str
    u: dict                          # pooled counts of the quantile residuals over U_BINS bins of (0, 1)
    pearson: dict                    # pooled counts of the Pearson residuals on PEARSON_EDGES
    fitted: dict                     # pooled per-bin sums against the linear predictor
    fitted_edges: np.ndarray
    draws: dict                      # n, Σ r*², Σ Var(r*²)
    pearson_sums: dict               # n, Σ r, Σ r² at the modes
    seed: int = 0
    extra: dict = field(default_factory=dict)

    quantile_note = "binned, 1% and 99% for Min and Max"

    # --- tests ----------------------------------------------------------------------------------
    def uniformity(self, max_bins: int = 20) -> dict:
        """Pearson's χ² test of uniformity of the pooled quantile-residual counts."""
        edges = np.r_[0, self.u["cuts"], U_BINS] / U_BINS
        counts = self.u["count"]
        n = counts.sum()
        k = int(max(2, min(max_bins, n // 5)))
        # contiguous groups of the pooled bins with about equal probability
        target = np.linspace(0, 1, k + 1)[1:-1]
        cut_at = np.unique(np.searchsorted(edges[1:-1], target - 1e-12))
        groups = np.split(np.arange(len(counts)), cut_at + 1) if len(counts) > 1 else [np.arange(1)]
        obs = np.array([counts[g].sum() for g in groups if len(g)])
        prob = np.array([edges[g[-1] + 1] - edges[g[0]] for g in groups if len(g)])
        exp = n * prob
        chi2 = float(np.sum((obs - exp) ** 2 / exp))
        df = len(obs) - 1
        ecdf = np.cumsum(counts) / n
        return {"statistic": chi2, "df": df, "p_value": float(stats.chi2.sf(chi2, df)) if df > 0 else np.nan,
                "max_deviation": float(np.max(np.abs(ecdf - edges[1:]))), "n": int(n)}

    def dispersion(self) -> dict | None:
        """The dispersion test of the module docstring (binomial and poisson models; None otherwise)."""
        if self.family not in ("binomial", "poisson"):
            return None
        n, ss, v = self.draws["n"], self.draws["sumsq"], self.draws["var_sumsq"]
        z = (ss - n) / np.sqrt(v)
        return {"ratio": float(ss / n), "z": float(z), "p_value": float(2.0 * special.ndtr(-abs(z))),
                "pearson_chisq": float(self.pearson_sums["sumsq"]), "n": int(n)}

    # --- summaries for the printout and the plots --------------------------------------------------
    def scaled_quantiles(self, probs=(0.01, 0.25, 0.5, 0.75, 0.99)) -> np.ndarray:
        """Quantiles of the Pearson residuals at the modes, interpolated within the pooled bins."""
        grid = np.r_[PEARSON_EDGES[0], PEARSON_EDGES, PEARSON_EDGES[-1]]   # open tails clipped to the grid
        cuts = self.pearson["cuts"]
        lo = grid[np.r_[0, cuts]]
        hi = grid[np.r_[cuts, len(PEARSON_EDGES) + 1]]
        counts = self.pearson["count"]
        cum = np.r_[0.0, np.cumsum(counts)] / counts.sum()
        out = []
        for p in probs:
            b = int(np.clip(np.searchsorted(cum, p, side="left") - 1, 0, len(counts) - 1))
            frac = (p - cum[b]) / (cum[b + 1] - cum[b]) if cum[b + 1] > cum[b] else 0.5
            out.append(lo[b] + np.clip(frac, 0.0, 1.0) * (hi[b] - lo[b]))
        return np.asarray(out)

    def binned_residuals(self, nbins: int = 20) -> dict:
        """About ``nbins`` bins of similar counts: mean fitted value, mean residual and its SE."""
        f = self.fitted
        cnt = f["count"]
        cum = np.cumsum(cnt) / cnt.sum()
        group = np.minimum((cum * nbins - 1e-9).astype(int), nbins - 1)
        out = {k: np.bincount(group, weights=f[k], minlength=nbins) for k in ("count", "fit", "res", "var")}
        keep = out["count"] > 0
        c = out["count"][keep]
        return {"count": c, "fitted": out["fit"][keep] / c, "residual": out["res"][keep] / c,
                "se": np.sqrt(out["var"][keep]) / c}

    def qq_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(expected, observed) cumulative probabilities of the quantile residuals at the pooled bins'
        upper edges (a binned QQ plot on the uniform scale)."""
        edges = np.r_[self.u["cuts"], U_BINS] / U_BINS
        cum = np.cumsum(self.u["count"]) / self.u["count"].sum()
        return edges[:-1], cum[:-1]

    def to_dict(self) -> dict:
        out = {"uniformity": self.uniformity(), "scaled_residuals": self.scaled_quantiles().tolist(),
               "seed": self.seed}
        disp = self.dispersion()
        if disp is not None:
            out["dispersion"] = disp
        return out


def combine(replies: dict, family: str, edges: np.ndarray, seed: int) -> Diagnostics:
    """The sites' ``residuals`` replies pooled."""
    parts = [r["residuals"] for r in replies.values()]
    pearson = pool([p["pearson"] for p in parts], len(PEARSON_EDGES) + 1)
    fitted = pool([p["fitted"] for p in parts], len(edges) + 1)
    u = pool([p["u"] for p in parts], U_BINS)
    draws = {k: float(sum(p["draws"][k] for p in parts)) for k in ("n", "sumsq", "var_sumsq")}
    sums = {k: float(sum(p["pearson"][k] for p in parts)) for k in ("n", "sum", "sumsq")}
    return Diagnostics(family, u, pearson, fitted, np.asarray(edges), draws, sums, seed)


def run_diagnostics(session, seed: int = 0) -> Diagnostics:
    """One round: every site's residual aggregates at the estimate, pooled."""
    req = inspect_request(session, ["residuals"], seed)
    replies = session.broadcast(req, "diagnostics")
    return combine(replies, session.family.name, req["fitted_edges"], seed)


def posterior_means(session, nodes: int | None = None) -> tuple[list, np.ndarray, np.ndarray, list]:
    """One round: each group's posterior means and SDs of its random effects (internal scale), the
    levels, and the levels a site withheld."""
    q = session.setup.mask.shape[0]
    k = nodes or {1: 15, 2: 9, 3: 5}.get(q, 3)
    replies = session.broadcast(inspect_request(session, ["posterior"], nodes=k), "posterior")
    levels, means, sds, withheld = [], [], [], []
    for r in replies.values():
        post = r["posterior"]
        levels += list(post["levels"])
        means.append(np.reshape(post["mean"], (-1, q)))
        sds.append(np.reshape(post["sd"], (-1, q)))
        withheld += list(post.get("withheld", []))
    return levels, np.vstack(means), np.vstack(sds), withheld
