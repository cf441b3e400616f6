"""The quantities profile intervals are made for, as functions of the profiling coordinates, and the
objective in those coordinates.

Coordinates x = (γ, θ̃) for GLMMs -- the internal fixed effects and relative covariance factor of
:mod:`fedglmm.model.spec` -- and x = (γ, θ̃, s) for gaussian models, s = log σ.  Each profiled quantity is
a smooth function h(x) on a scale where it is unbounded: log of a random-effect SD, atanh of a
correlation, log σ, or a fixed effect β_j = (Aγ)_j itself.  Intervals are invariant to such monotone
transformations, so the endpoints are transformed back (exp, tanh).  Names and order as lme4's
(``sd_Intercept|g``, ``cor_x.Intercept|g``, ..., ``sigma``, then the fixed effects), with the package's
term names.

The objective f(x) = −ℓ(x): for GLMMs the sites' Laplace / AGHQ value, gradient and Hessian; for gaussian
models the ML deviance with β and σ not profiled out,

    2f = d(θ) + n log 2π + 2n s + e^{−2s} (c − 2bᵀγ + γᵀAγ),

with its exact gradient and Hessian in (γ, θ̃, s) from the sites' sums A, b, c, d and their first and
second θ-derivatives (:mod:`fedglmm.likelihood.lmm`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.spec import theta_index


@dataclass
class Quantity:
    """One profiled quantity: its name, how to compute it (``kind`` and indices) and its back-transform."""

    name: str
    kind: str              # "beta", "sd", "cor", "sigma"
    index: tuple
    back: str              # "identity", "exp", "tanh"

    def value(self, x: np.ndarray, layout) -> float:
        return float(_value(self, x, layout))

    def grad(self, x: np.ndarray, layout) -> np.ndarray:
        return _grad(self, x, layout)

    def hess(self, x: np.ndarray, layout) -> np.ndarray:
        """By central differences of the analytic gradient (local arithmetic only)."""
        P = len(x)
        H = np.empty((P, P))
        for t in range(P):
            h = 1e-6 * (1.0 + abs(x[t]))
            e = np.zeros(P)
            e[t] = h
            H[:, t] = (_grad(self, x + e, layout) - _grad(self, x - e, layout)) / (2.0 * h)
        return 0.5 * (H + H.T)

    def original(self, h: float) -> float:
        """The quantity on its own scale from h."""
        return {"identity": h, "exp": float(np.exp(h)), "tanh": float(np.tanh(h))}[self.back]


@dataclass
class Layout:
    """Where γ, θ̃ and s sit in x, and what maps them to the user's quantities."""

    p: int
    k: int
    gaussian: bool
    A: np.ndarray                  # β = Aγ
    zs: np.ndarray                 # Λ = diag(zs)⁻¹ Λ̃
    rows: np.ndarray               # θ̃'s positions in Λ̃
    cols: np.ndarray

    @property
    def size(self) -> int:
        return self.p + self.k + (1 if self.gaussian else 0)

    def theta(self, x):
        return x[self.p:self.p + self.k]


def quantities(setup, group: str | None, gaussian: bool) -> tuple[Layout, list[Quantity]]:
    """The layout and the quantities in lme4's order (see the module docstring); each random-effect term is
    named with its grouping factor (``setup.zgroups``; ``group`` when the model has one)."""
    rows, cols = theta_index(setup.mask)
    layout = Layout(len(setup.names), len(rows), gaussian, setup.A, setup.zs, rows, cols)
    q = setup.mask.shape[0]
    out = []
    znames = list(setup.znames)
    zgroup = list(getattr(setup, "zgroups", None) or [group] * q)
    for c in range(q):                        # Λ's lower triangle column by column, as lme4's θ
        for r in range(c, q):
            if r == c and setup.mask[r, c]:
                out.append(Quantity(f"sd_{znames[r]}|{zgroup[r]}", "sd", (r,), "exp"))
            elif r > c and _correlated(setup.mask, r, c):
                out.append(Quantity(f"cor_{znames[r]}.{znames[c]}|{zgroup[r]}", "cor", (r, c), "tanh"))
    if gaussian:
        out.append(Quantity("sigma", "sigma", (), "exp"))
    for j, nm in enumerate(setup.names):
        out.append(Quantity(nm, "beta", (j,), "identity"))
    return layout, out


def _correlated(mask, r, c) -> bool:
    """Whether rows r and c of Λ share a free column (their effects may be correlated)."""
    return bool(np.any(mask[r, : c + 1] & mask[c, : c + 1]))


def _row(x, L: Layout, r):
    """Row r of Λ̃ (its free entries) and their positions in x."""
    sel = np.flatnonzero(L.rows == r)
    return x[L.p + sel], L.p + sel, L.cols[sel]


def _value(qty: Quantity, x, L: Layout):
    if qty.kind == "beta":
        return L.A[qty.index[0]] @ x[:L.p]
    if qty.kind == "sigma":
        return x[-1]
    if qty.kind == "sd":
        v, _, _ = _row(x, L, qty.index[0])
        out = 0.5 * np.log(v @ v) - np.log(L.zs[qty.index[0]])
        return out + (x[-1] if L.gaussian else 0.0)
    vi, _, ci = _row(x, L, qty.index[0])
    vj, _, cj = _row(x, L, qty.index[1])
    dot = sum(vi[a] * vj[b] for a in range(len(ci)) for b in range(len(cj)) if ci[a] == cj[b])
    rho = np.clip(dot / np.sqrt((vi @ vi) * (vj @ vj)), -1 + 1e-15, 1 - 1e-15)
    return np.arctanh(rho)


def _grad(qty: Quantity, x, L: Layout) -> np.ndarray:
    g = np.zeros(len(x))
    if qty.kind == "beta":
        g[:L.p] = L.A[qty.index[0]]
        return g
    if qty.kind == "sigma":
        g[-1] = 1.0
        return g
    if qty.kind == "sd":
        v, pos, _ = _row(x, L, qty.index[0])
        g[pos] = v / (v @ v)
        if L.gaussian:
            g[-1] = 1.0
        return g
    vi, pi, ci = _row(x, L, qty.index[0])
    vj, pj, cj = _row(x, L, qty.index[1])
    ni, nj = vi @ vi, vj @ vj
    wi = np.array([vj[list(cj).index(c)] if c in cj else 0.0 for c in ci])   # Λ̃_j at Λ̃_i's columns
    wj = np.array([vi[list(ci).index(c)] if c in ci else 0.0 for c in cj])
    dot = wi @ vi
    rho = dot / np.sqrt(ni * nj)
    rho = np.clip(rho, -1 + 1e-15, 1 - 1e-15)
    dr_i = wi / np.sqrt(ni * nj) - rho * vi / ni
    dr_j = wj / np.sqrt(ni * nj) - rho * vj / nj
    g[pi] += dr_i / (1.0 - rho * rho)
    g[pj] += dr_j / (1.0 - rho * rho)
    return g


def lmm_objective(x: np.ndarray, s: dict, L: Layout):
    """f = ½ × the ML deviance of a gaussian model at x = (γ, θ̃, log σ), its gradient and Hessian, from
    the summed sums ``s`` at θ̃."""
    p, k = L.p, L.k
    gam, ls = x[:p], x[-1]
    A, b, c, d, n = s["A"], s["b"], float(s["c"]), float(s["d"]), float(s["n"])
    e = np.exp(-2.0 * ls)
    r = -2.0 * b + 2.0 * A @ gam                     # ∂Q/∂γ
    Q = c - 2.0 * b @ gam + gam @ A @ gam
    D = d + n * np.log(2.0 * np.pi) + 2.0 * n * ls + e * Q
    P = p + k + 1
    g, H = np.zeros(P), np.zeros((P, P))
    g[:p], g[-1] = e * r, 2.0 * n - 2.0 * e * Q
    H[:p, :p] = 2.0 * e * A
    H[:p, -1] = H[-1, :p] = -2.0 * e * r
    H[-1, -1] = 4.0 * e * Q
    if k:
        dQ = s["dc"] - 2.0 * s["db"] @ gam + np.einsum("p,tpr,r->t", gam, s["dA"], gam)
        th = slice(p, p + k)
        g[th] = s["dd"] + e * dQ
        H[th, th] = s["d2d"] + e * (s["d2c"] - 2.0 * s["d2b"] @ gam + np.einsum("p,stpr,r->st", gam, s["d2A"], gam))
        cross = e * (-2.0 * s["db"] + 2.0 * s["dA"] @ gam)            # (k, p)
        H[th, :p], H[:p, th] = cross, cross.T
        H[th, -1] = H[-1, th] = -2.0 * e * dQ
    return 0.5 * D, 0.5 * g, 0.5 * H
