"""Set-up: the sums a part (a site, or pseudo-data) sends once, and what a fit makes of their total --
the design's names and counts, and the internal scale (:mod:`fedglmm.model.spec`) with the rank check."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..model.families import Family
from ..model.spec import Design, theta_index


def setup_reply(d: Design, family: Family) -> dict:
    """A part's set-up reply: counts, its design's names and Λ pattern, column moments (for the internal
    scale and the rank check) and, for GLMMs, the sums of :func:`start_sums` -- totals, nothing per row."""
    X = d.X
    reply = {"n": d.n, "ngroups": len(d.group_levels) if d.Z.shape[1] else 0,
             "x_names": list(d.x_names), "z_names": list(d.z_names), "theta_mask": np.asarray(d.theta_mask),
             "colsum": X.sum(axis=0), "colsq": (X * X).sum(axis=0), "xtx": X.T @ X,
             "ztz": d.Z.T @ d.Z}
    if family.name != "gaussian":
        reply.update(start_sums(d, family))
    return reply


def sum_replies(replies: dict, keys) -> dict:
    """The sum over parts of each of ``keys`` (as floats)."""
    vals = list(replies.values())
    return {k: sum(np.asarray(r[k], float) for r in vals) for k in keys}


def start_sums(d, family) -> dict:
    """Sums for starting values, summed over the site's rows and groups (nothing per row or group).

    Binomial: one IRLS step from the intercept-only model η = c.  With a constant start, μ_j = m_j μ(c),
    the IRLS weight is m_j μ'(c)²/V(μ(c)) and w_j z_j is a fixed combination of y_j and m_j, so the step
    needs only XᵀMX, Xᵀm and Xᵀy, whatever c the coordinator picks (c = link(Σy / Σm)); for the first
    estimate of Σ the same holds per group, through the moments of A_g = Σ ζ_j y_j, B_g = Σ ζ_j m_j,
    T_g = Σ m_j ζ_j x_jᵀ and W_g = Σ m_j ζ_j ζ_jᵀ (see :func:`fedglmm.likelihood.starts.null_step_start`).

    Poisson: one IRLS step from μ = y + ½ (near each count, so log y is linearised where it is accurate
    even for large random-effect variances), with the moments of the working residuals per group (see
    :func:`fedglmm.likelihood.starts.moment_start`).
    """
    y, X, Zm = d.y, d.X, d.Z
    st = d.starts
    if family.name == "binomial":
        v = d.trials
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
        return out
    eta = family.linkfun(y + 0.5)
    d1, _, w, _ = family.derivs(y, d.trials, eta)
    z = eta + d1 / w - d.offset            # IRLS working response
    out = {"xtwx": (X * w[:, None]).T @ X, "xtwz": X.T @ (w * z)}
    if Zm.shape[1]:
        s_g = np.add.reduceat(Zm * (w * z)[:, None], st, axis=0)                        # (G, q)
        T_g = np.add.reduceat((Zm * w[:, None])[:, :, None] * X[:, None, :], st, axis=0)  # (G, q, p)
        W_g = np.add.reduceat((Zm * w[:, None])[:, :, None] * Zm[:, None, :], st, axis=0)  # (G, q, q)
        out.update({"mom_ss": s_g.T @ s_g, "mom_st": np.einsum("ga,gbk->abk", s_g, T_g),
                    "mom_tt": np.einsum("gak,gbl->akbl", T_g, T_g),
                    "mom_ww": np.einsum("gab,gcd->abcd", W_g, W_g), "mom_w": W_g.sum(axis=0)})
    return out


def scaling_transform(names: list[str], colsum: np.ndarray, colsq: np.ndarray, n: int) -> np.ndarray:
    """A with X̃ = XA: centre and scale each column by its pooled mean and SD (intercept kept as is)."""
    p = len(names)
    A = np.eye(p)
    has_int = "Intercept" in names
    mean = colsum / n
    for j, name in enumerate(names):
        if name == "Intercept":
            continue
        if has_int:
            sd = np.sqrt(max(colsq[j] / n - mean[j] ** 2, 0.0))
            if sd <= 1e-12 * max(1.0, abs(mean[j])):
                raise InputError(f"fixed-effect column '{name}' is constant over all sites "
                                 "and duplicates the intercept")
            A[j, j] = 1.0 / sd
            A[names.index("Intercept"), j] = -mean[j] / sd
        else:
            rms = np.sqrt(colsq[j] / n)
            if rms == 0:
                raise InputError(f"fixed-effect column '{name}' is zero over all sites")
            A[j, j] = 1.0 / rms
    return A


def check_rank(names, xtx_scaled):
    lam, vec = np.linalg.eigh(xtx_scaled)
    if lam[0] <= 1e-10 * lam[-1]:
        bad = [names[i] for i in np.flatnonzero(np.abs(vec[:, 0]) > 1e-3)]
        raise InputError("fixed-effect columns are linearly dependent over the pooled data: " + ", ".join(bad))


@dataclass
class Setup:
    """What a fit knows after set-up (all in the agreed, global coding): design column names, the Λ pattern,
    counts, the set-up sums over all parts, and the internal scale chosen from them."""

    names: list
    znames: list
    mask: np.ndarray
    n: int
    ngroups: int
    sums: dict                  # setup replies summed over sites
    A: np.ndarray               # X̃ = X A
    zs: np.ndarray              # Z̃ = Z / zs

    @property
    def scale(self) -> dict:
        return {"transform": self.A, "zscale": self.zs}

    @property
    def theta_scale(self) -> np.ndarray:
        """θ̃ = θ · theta_scale: each θ entry's Z column scale (Λ̃ = diag(zs) Λ)."""
        return self.zs[theta_index(self.mask)[0]] if self.mask.shape[0] else np.zeros(0)

    def internal_transform(self) -> np.ndarray:
        """T with (γ, θ̃) = T (β, θ): the internal scale from the user's (γ = A⁻¹β, θ̃ = diag(zs) θ)."""
        p, ts = len(self.names), self.theta_scale
        T = np.zeros((p + len(ts), p + len(ts)))
        T[:p, :p] = np.linalg.solve(self.A, np.eye(p))
        T[p:, p:] = np.diag(ts)
        return T


def make_setup(replies: dict) -> Setup:
    """Scaling and counts from the parts' set-up replies (in the global coding; see :func:`setup_reply`)."""
    first = next(iter(replies.values()))
    names, znames = list(first["x_names"]), list(first["z_names"])
    mask = np.asarray(first["theta_mask"], bool)
    n = int(sum(r["n"] for r in replies.values()))
    ngroups = int(sum(r["ngroups"] for r in replies.values()))
    keys = [k for k, v in first.items() if isinstance(v, (np.ndarray, float, int)) and k not in ("n", "ngroups")
            and k != "theta_mask"]
    sums = sum_replies(replies, keys)
    A = scaling_transform(names, sums["colsum"], sums["colsq"], n)
    check_rank(names, A.T @ sums["xtx"] @ A)
    zs = np.sqrt(np.diag(sums["ztz"]) / n) if mask.shape[0] else np.ones(0)   # Z̃ = Z / zs: Λ̃ = diag(zs) Λ
    zs = np.where(zs > 0, zs, 1.0)
    return Setup(names, znames, mask, n, ngroups, sums, A, zs)
