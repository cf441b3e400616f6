"""Variance components as R reports them: ``as.data.frame(VarCorr(m))`` and the intraclass correlation."""
from __future__ import annotations

import numpy as np
import pandas as pd


def varcorr(res) -> pd.DataFrame:
    """The variance components as R's ``as.data.frame(VarCorr(m))``: columns grp, var1, var2, vcov,
    sdcor; per grouping factor the variances (var2 missing) then the covariances (sdcor: the
    correlation), then the residual (gaussian)."""
    rows = []
    covs = res.covariances()
    # lme4 orders the grouping factors by decreasing number of levels (ties: as in the formula)
    order = sorted(covs, key=lambda g: -int(res.ngroups.get(g, 0)))
    for group in order:
        frame = covs[group]
        cov, names = frame.to_numpy(), [str(n) for n in frame.index]
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        rows += [(group, n, None, float(cov[i, i]), float(sd[i])) for i, n in enumerate(names)]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if cov[i, j] != 0.0 or cov[j, i] != 0.0:
                    corr = cov[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else float("nan")
                    rows.append((group, names[i], names[j], float(cov[i, j]), float(corr)))
    if res.residual_sd is not None:
        rows.append(("Residual", None, None, float(res.residual_sd ** 2), float(res.residual_sd)))
    out = pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])
    for c in ("grp", "var1", "var2"):       # missing names stay None, as R's NA
        out[c] = pd.Series([r[k] for r in rows for k in [("grp", "var1", "var2").index(c)]], dtype=object)
    return out

def icc(res) -> pd.Series:
    """The intraclass correlation of Nakagawa, Johnson & Schielzeth (2017, J. R. Soc. Interface 14:
    20170213), as ``performance::icc``: ``adjusted`` = σ²_d / (σ²_d + σ²_ε) and ``conditional`` =
    σ²_d / (σ²_f + σ²_d + σ²_ε), with σ²_d the random-effect variance (for random slopes its mean
    over the rows, tr(Σ ZᵀZ)/n), σ²_f the sample variance of the fixed-effect predictions Xβ̂ (from
    the pooled XᵀX and column sums) and σ²_ε the residual variance: σ² (gaussian), or the latent
    scale's π²/3 (logit), 1 (probit), π²/6 (cloglog).  Poisson models have no ICC here (NaN).  With
    several grouping factors σ²_d is their sum, and ``group:<factor>`` = σ²_k / (σ²_d + σ²_ε) each
    factor's share (performance's ICC "by group")."""
    if res.cov_re is None:
        raise ValueError("this model has no random effects")
    resid = {"identity": None, "logit": np.pi ** 2 / 3, "probit": 1.0, "cloglog": np.pi ** 2 / 6}
    if res.family.link not in resid:
        return pd.Series({"adjusted": np.nan, "conditional": np.nan}, name="icc")
    s2e = res.residual_sd ** 2 if res.family.name == "gaussian" else resid[res.family.link]
    m = res.design_moments
    n = float(m["n"])
    from scipy.linalg import block_diag

    covs = res.covariances()
    cov = block_diag(*[c.to_numpy() for c in covs.values()])    # Z's columns, factor by factor
    s2d = float(np.trace(cov @ m["ztz"]) / n)
    beta = res.fixef.to_numpy()
    mean = m["colsum"] @ beta / n
    s2f = float((beta @ m["xtx"] @ beta - n * mean ** 2) / (n - 1))
    out = {"adjusted": s2d / (s2d + s2e), "conditional": s2d / (s2f + s2d + s2e),
           "var_random": s2d, "var_fixed": s2f, "var_residual": s2e}
    if len(covs) > 1:
        start = 0
        for g, c in covs.items():
            k = c.shape[0]
            block = m["ztz"][start:start + k, start:start + k]
            out[f"group:{g}"] = float(np.trace(c.to_numpy() @ block) / n) / (s2d + s2e)
            start += k
    return pd.Series(out, name="icc")
