"""Set-up: the sums a part (a site, or pseudo-data) sends once, and what a fit makes of their total --
the design's names and counts, and the internal scale (:mod:`fedglmm.model.spec`) with the rank check."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..model.families import Family
from ..model.spec import Design, theta_index
from .start_sums import factor_start_sums, log_weights, start_sums  # noqa: F401  (start_sums: re-exported)


def setup_reply(d: Design, family: Family) -> dict:
    """A part's set-up reply: counts, its design's names and Λ pattern, column moments (for the internal
    scale and the rank check) and, for GLMMs, the sums of :func:`start_sums` -- totals, nothing per row."""
    X = d.X
    reply = {"n": d.n, "ngroups": len(d.group_levels) if d.Z.shape[1] else 0,
             "x_names": list(d.x_names), "z_names": list(d.z_names), "theta_mask": np.asarray(d.theta_mask),
             "colsum": X.sum(axis=0), "colsq": (X * X).sum(axis=0), "xtx": X.T @ X,
             "ztz": d.Z.T @ d.Z}
    if d.factors:
        reply["ngroups"] = {f.name: len(f.levels) for f in d.factors}
        reply["z_groups"] = [f.name for f in d.factors for _ in f.columns]
    if d.factors:
        reply.update(factor_start_sums(d, family))
    elif family.name != "gaussian":
        reply.update(start_sums(d, family))
    if family.name == "gaussian" and d.weighted:
        reply["ldw"] = log_weights(d.trials)
    return reply


def sum_replies(replies: dict, keys) -> dict:
    """The sum over parts of each of ``keys`` (as floats)."""
    vals = list(replies.values())
    return {k: sum(np.asarray(r[k], float) for r in vals) for k in keys}


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
    counts, the set-up sums over all parts, and the internal scale chosen from them.  With several
    grouping factors, ``factor_groups`` counts each factor's levels and ``zgroups`` names the factor of
    each Z column (both empty with one factor)."""

    names: list
    znames: list
    mask: np.ndarray
    n: int
    ngroups: int
    sums: dict                  # setup replies summed over sites
    A: np.ndarray               # X̃ = X A
    zs: np.ndarray              # Z̃ = Z / zs
    factor_groups: dict = field(default_factory=dict)
    zgroups: list = field(default_factory=list)
    ndisp: int = 0              # dispersion parameters (ψ, the last coordinates of a GLMM's parameters)
    shared: dict = field(default_factory=dict)      # factor -> {level: sites} for levels at several sites

    def factor_columns(self) -> dict:
        """{factor: its Z columns} (several grouping factors only)."""
        return {g: np.flatnonzero(np.asarray(self.zgroups) == g) for g in self.factor_groups}

    @property
    def scale(self) -> dict:
        return {"transform": self.A, "zscale": self.zs}

    @property
    def theta_scale(self) -> np.ndarray:
        """θ̃ = θ · theta_scale: each θ entry's Z column scale (Λ̃ = diag(zs) Λ)."""
        return self.zs[theta_index(self.mask)[0]] if self.mask.shape[0] else np.zeros(0)

    def internal_transform(self) -> np.ndarray:
        """T with (γ, θ̃, ψ) = T (β, θ, ψ): the internal scale from the user's (γ = A⁻¹β, θ̃ = diag(zs) θ;
        the log-dispersion ψ as it is)."""
        p, ts = len(self.names), self.theta_scale
        k = p + len(ts)
        T = np.eye(k + self.ndisp)
        T[:p, :p] = np.linalg.solve(self.A, np.eye(p))
        T[p:k, p:k] = np.diag(ts)
        return T


def make_setup(replies: dict, ndisp: int = 0) -> Setup:
    """Scaling and counts from the parts' set-up replies (in the global coding; see :func:`setup_reply`);
    ``ndisp``: the family's dispersion parameters."""
    first = next(iter(replies.values()))
    names, znames = list(first["x_names"]), list(first["z_names"])
    mask = np.asarray(first["theta_mask"], bool)
    n = int(sum(r["n"] for r in replies.values()))
    counts = [r["ngroups"] for r in replies.values()]
    factor_groups = {g: int(sum(c[g] for c in counts)) for g in counts[0]} if isinstance(counts[0], dict) else {}
    ngroups = int(sum(factor_groups.values())) if factor_groups else int(sum(counts))
    keys = [k for k, v in first.items() if isinstance(v, (np.ndarray, float, int)) and k not in ("n", "ngroups")
            and k != "theta_mask"]
    sums = sum_replies(replies, keys)
    A = scaling_transform(names, sums["colsum"], sums["colsq"], n)
    check_rank(names, A.T @ sums["xtx"] @ A)
    zs = np.sqrt(np.diag(sums["ztz"]) / n) if mask.shape[0] else np.ones(0)   # Z̃ = Z / zs: Λ̃ = diag(zs) Λ
    zs = np.where(zs > 0, zs, 1.0)
    return Setup(names, znames, mask, n, ngroups, sums, A, zs, factor_groups, list(first.get("z_groups", [])),
                 int(ndisp))
