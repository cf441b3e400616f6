"""The set-up sums a site sends for starting values: totals over its rows and groups, nothing per row
or group (what the coordinator makes of them: :mod:`fedglmm.likelihood.starts` and, with several grouping
factors, :mod:`fedglmm.likelihood.factor_starts`)."""
from __future__ import annotations

import numpy as np

from ..model.families import Family
from ..model.spec import Design
from .sparse import _unique_pairs, aggregator

MOMENT_KEYS = ("mom_ss", "mom_st", "mom_tt", "mom_ww", "mom_w")
BINOMIAL_KEYS = ("st_aa", "st_ab", "st_bb", "st_at", "st_bt", "st_tt", "st_ww", "st_w")


def from_null_model(family: Family) -> bool:
    """Whether the start is one IRLS step from the intercept-only model
    (:func:`fedglmm.likelihood.starts.null_step_start`): binomial, and Gamma with the inverse or identity
    link (its step from μ = y would weight the rows by y⁻⁴ or y⁻²)."""
    return family.name == "binomial" or (family.name == "gamma" and family.link != "log")


def log_weights(w) -> float:
    """Σ log w over the rows with a positive precision weight: a gaussian model's log-likelihood gains half
    of it (the rows' variances are σ²/w), as lmer's."""
    w = np.asarray(w, float)
    return float(np.sum(np.log(w[w > 0])))


def start_sums(d, family) -> dict:
    """Sums for starting values, summed over the site's rows and groups (nothing per row or group).

    Binomial: one IRLS step from the intercept-only model η = c.  With a constant start, μ_j = m_j μ(c),
    the IRLS weight is m_j μ'(c)²/V(μ(c)) and w_j z_j is a fixed combination of y_j and m_j, so the step
    needs only XᵀMX, Xᵀm and Xᵀy, whatever c the coordinator picks (c = link(Σy / Σm)); for the first
    estimate of Σ the same holds per group, through the moments of A_g = Σ ζ_j y_j, B_g = Σ ζ_j m_j,
    T_g = Σ m_j ζ_j x_jᵀ and W_g = Σ m_j ζ_j ζ_jᵀ (see :func:`fedglmm.likelihood.starts.null_step_start`).

    Poisson (and negative binomial): one IRLS step from μ = y + ½ (near each count, so log y is linearised
    where it is accurate even for large random-effect variances), with the moments of the working
    residuals per group (see :func:`fedglmm.likelihood.starts.moment_start`); Gamma with the log link: the
    same from μ = y; Gamma with the inverse or identity link: as binomial, with V(μ) = μ².

    Families with a dispersion parameter add the within-group regression sums of :func:`within_sums`.
    """
    y, X, Zm = d.y, d.X, d.Z
    st = d.starts
    if from_null_model(family):
        v = d.trials
        if family.name != "binomial":       # Gamma: the prior weights multiply each row's contribution
            y = v * y
        out = {"st_xvx": (X * v[:, None]).T @ X, "st_xv": X.T @ v, "st_xy": X.T @ y,
               "st_sy": float(y.sum()), "st_sv": float(v.sum())}
        if Zm.shape[1]:
            A_g = np.add.reduceat(Zm * y[:, None], st, axis=0)                                  # (G, q)
            B_g = np.add.reduceat(Zm * v[:, None], st, axis=0)
            T_g = np.add.reduceat((Zm * v[:, None])[:, :, None] * X[:, None, :], st, axis=0)  # (G, q, p)
            W_g = np.add.reduceat((Zm * v[:, None])[:, :, None] * Zm[:, None, :], st, axis=0)  # (G, q, q)
            out.update({"st_aa": A_g.T @ A_g, "st_ab": A_g.T @ B_g, "st_bb": B_g.T @ B_g,
                        "st_at": np.einsum("ga,gbk->abk", A_g, T_g), "st_bt": np.einsum("ga,gbk->abk", B_g, T_g),
                        "st_tt": np.einsum("gak,gbl->akbl", T_g, T_g),
                        "st_ww": np.einsum("gab,gcd->abcd", W_g, W_g), "st_w": W_g.sum(axis=0)})
        if family.ndisp:
            out.update(within_sums(d, np.log(d.y), Zm))
        return out
    w, z = working_response(d, family)
    out = {"xtwx": (X * w[:, None]).T @ X, "xtwz": X.T @ (w * z)}
    if family.ndisp:
        out.update(within_sums(d, np.log(y) if family.name == "gamma" else y, Zm))
    if Zm.shape[1]:
        out.update(working_moments(Zm, X, w, z, st))
        if family.name == "negative_binomial":
            out["mom_w2"] = (Zm * (w * w)[:, None]).T @ Zm
    return out


def working_response(d: Design, family: Family) -> tuple[np.ndarray, np.ndarray]:
    """IRLS weights and working response (without the offset) of one step from μ = y + ½ (poisson, negative
    binomial at ϑ = ∞) or μ = y (Gamma, log link)."""
    y = d.y
    eta = family.linkfun(y if family.name == "gamma" else y + 0.5)
    d1, _, w, _ = family.derivs(y, d.trials, eta)
    return w, eta + np.divide(d1, w, out=np.zeros_like(d1), where=w > 0) - d.offset


def within_sums(d: Design, z: np.ndarray, Z: np.ndarray | None = None) -> dict:
    """The regression of z (Gamma: log y; negative binomial: y) on X within the groups (each centred on its
    group's means, or with slopes projected as below): XᵀX, Xᵀz and zᵀz of those columns, the rows less the
    groups, Σz and Σz².  Their totals give a first dispersion estimate free of the random intercepts
    (:func:`fedglmm.likelihood.starts.dispersion_start`).  With ``Z`` of several columns (random slopes: the
    rows' Z of the one grouping factor) each group's rows are projected off its own Z columns instead -- its
    own intercept and slopes --, the rows less the rank of each group's ZᵀZ: centred on the means alone, the
    slopes' variance went into the residuals (NB with ``(t | g)`` over 5 sites of 4 groups of 8 rows: the
    set-up's ψ0 −0.64, now −0.18, where the fit's is 0.61; ``benchmarks/small_sites_rounds.py`` seed 2)."""
    st = d.starts if d.n else np.zeros(1, dtype=np.int64)
    count = np.diff(np.r_[st, d.n])
    gidx = np.repeat(np.arange(len(st)), count)
    if Z is not None and Z.shape[1] > 1 and d.n:
        ZZ = np.add.reduceat(Z[:, :, None] * Z[:, None, :], st, axis=0)                 # (G, q, q)
        inv = np.linalg.pinv(ZZ, rcond=1e-10, hermitian=True)
        BX = inv @ np.add.reduceat(Z[:, :, None] * d.X[:, None, :], st, axis=0)           # (G, q, p)
        Bz = np.einsum("gab,gb->ga", inv, np.add.reduceat(Z * z[:, None], st, axis=0))   # (G, q)
        Xc = d.X - np.einsum("na,nak->nk", Z, BX[gidx])
        zc = z - np.einsum("na,na->n", Z, Bz[gidx])
        df = float(d.n - np.rint(np.einsum("gab,gba->", inv, ZZ)))     # tr(ZZ⁺ZZ): the ranks pinv kept
    else:
        Xc = d.X - (np.add.reduceat(d.X, st, axis=0) / count[:, None])[gidx]
        zc = z - (np.add.reduceat(z, st) / count)[gidx]
        df = float(d.n - len(st))
    return {"st_wxx": Xc.T @ Xc, "st_wxz": Xc.T @ zc, "st_wzz": float(zc @ zc), "st_wdf": df,
            "st_z1": float(z.sum()), "st_z2": float(z @ z)}


def working_moments(Zm, X, w, z, st) -> dict:
    """The per-group moments of the working residuals (keys ``mom_*``, see :func:`start_sums`); the rows
    are sorted by group and ``st`` are the groups' first rows."""
    s_g = np.add.reduceat(Zm * (w * z)[:, None], st, axis=0)                        # (G, q)
    T_g = np.add.reduceat((Zm * w[:, None])[:, :, None] * X[:, None, :], st, axis=0)  # (G, q, p)
    W_g = np.add.reduceat((Zm * w[:, None])[:, :, None] * Zm[:, None, :], st, axis=0)  # (G, q, q)
    return {"mom_ss": s_g.T @ s_g, "mom_st": np.einsum("ga,gbk->abk", s_g, T_g),
            "mom_tt": np.einsum("gak,gbl->akbl", T_g, T_g),
            "mom_ww": np.einsum("gab,gcd->abcd", W_g, W_g), "mom_w": W_g.sum(axis=0)}


def factor_start_sums(d: Design, family: Family) -> dict:
    """The set-up sums for starting values with several grouping factors: the single-factor sums for each
    factor i alone (its columns, its levels as the groups; keys suffixed ``.i``), the sums without Z once,
    and the cross-products of each pair of factors i < k (``…_ww.i.k``)."""
    out = {}
    X = d.X
    if family.name == "gaussian":
        y = d.y - d.offset
        out.update({"xty": X.T @ y, "yty": float(y @ y)})
        w, z = np.ones(d.n), y
    elif from_null_model(family):
        w, z = d.trials, None
    else:
        w, z = working_response(d, family)
    zkeys = BINOMIAL_KEYS if from_null_model(family) else MOMENT_KEYS + ("mom_w2",)
    finest = None
    for i, f in enumerate(d.factors):
        order = np.argsort(f.codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(f.codes[order]) != 0])
        Zf = d.Z[order][:, f.columns]
        if family.name == "gaussian":
            sums = working_moments(Zf, X[order], w[order], z[order], starts)
        else:
            sub = Design(y=d.y[order], trials=d.trials[order], offset=d.offset[order], X=X[order], Z=Zf,
                         group=f.codes[order], group_levels=f.levels, x_names=d.x_names,
                         z_names=[d.z_names[c] for c in f.columns],
                         theta_mask=d.theta_mask[np.ix_(f.columns, f.columns)])
            sums = start_sums(sub, family)
            finest = sub if finest is None or len(sub.group_levels) > len(finest.group_levels) else finest
        out.update({(f"{k}.{i}" if k in zkeys else k): v for k, v in sums.items()})
    if family.ndisp:        # the dispersion's start: within the levels of the factor with the most
        out.update(within_sums(finest, np.log(finest.y) if family.name == "gamma" else finest.y))
    key = "st_ww" if from_null_model(family) else "mom_ww"
    for i, fi in enumerate(d.factors):
        for k in range(i + 1, len(d.factors)):
            fk = d.factors[k]
            _, _, row = _unique_pairs(fi.codes, fk.codes, len(fk.levels))
            prod = (w[:, None] * d.Z[:, fi.columns])[:, :, None] * d.Z[:, fk.columns][:, None, :]
            C = aggregator(row, int(row.max()) + 1) @ prod.reshape(d.n, -1)
            C = np.asarray(C).reshape(-1, fi.q, fk.q)
            out[f"{key}.{i}.{k}"] = np.einsum("pab,pdc->abcd", C, C)
    return out
