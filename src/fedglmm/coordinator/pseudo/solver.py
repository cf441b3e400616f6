"""The per-group generator: pseudo rows of one group whose moment sums match the targets -- the binary block,
a degree-≤2 closed form, then Levenberg-Marquardt on the effective moment equations (:func:`generate_group`)."""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import numpy as np

from ...model.moments import mono_values, relative_errors, unit
from .binary import _binary_block, _two_values
from .effective import derivative_tables, effective_sums, expand
from .structure import _check_expo, _closed, _find_derived, _standardise

__all__ = ["generate_group", "PseudoDataWarning", "MAX_BINARY"]

#: Binary variables kept exactly 0/1 at most (the cell integer program has ``2 ** MAX_BINARY`` unknowns).
MAX_BINARY = 10


class PseudoDataWarning(UserWarning):
    """A requested property of the pseudo data could not be honoured exactly."""


def _psd_factor(W: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """L with L Lᵀ = W (its PSD part): columns for eigenvalues above rtol × largest, largest first."""
    lam, Q = np.linalg.eigh((W + W.T) / 2)
    lam, Q = lam[::-1], Q[:, ::-1]
    keep = lam > rtol * max(lam[0], 0.0) if lam.size else np.zeros(0, bool)
    return Q[:, keep] * np.sqrt(lam[keep])


def _sym_pow(S: np.ndarray, power: float) -> np.ndarray:
    """``S ** power`` of a symmetric matrix, by its eigen-decomposition."""
    lam, Q = np.linalg.eigh((S + S.T) / 2)
    return (Q * lam ** power) @ Q.T


class _Group:
    """One group in internal coordinates x' (binaries: their 0/1 coding u; others centred and scaled).

    Columns are of four kinds: binary (the fixed 0/1 block U), constant (x' = 0), derived (an exact
    polynomial of other columns, found by :func:`.structure._find_derived`) and base (the unknowns).  Every
    monomial of ``expo`` is expanded into a polynomial of the base and binary variables: the targets become
    a linear system ``A s = t'`` in the sums ``s`` of the distinct *effective* monomials (derived columns
    raise the degree: age² as a column makes Σ(age²)⁴ a degree-8 moment of age).  That system is solved
    for ``s*`` once (least squares, SVD); the nonlinear least squares then matches
    ``Σ_rows effective monomial = s*`` -- well conditioned and free of the duplicate equations (b² = b,
    age² · x = age2 · x) that the raw system has."""

    def __init__(self, n, expo, target, declared, nonneg, rng):
        self.n, self.expo, self.target = n, expo, target
        d = self.d = expo.shape[1]
        idx = {tuple(r): m for m, r in enumerate(expo)}
        K = int(expo.sum(axis=1).max())
        closed = _closed(expo)
        # -- binary variables: declared (0/1), then any variable the moments force to two values (K ≥ 4)
        coding = {k: (0.0, 1.0) for k in declared[:MAX_BINARY]}
        self.as_real = list(declared[MAX_BINARY:])
        if K >= 4:
            for k in range(d):
                if k in coding or k in self.as_real:
                    continue
                mom = [idx.get(unit(d, *([k] * j))) for j in range(1, 5)]
                if any(m is None for m in mom):
                    continue
                ab = _two_values(n, *(float(target[m]) for m in mom))
                if ab is not None and (closed or ab == (0.0, 1.0)):
                    if len(coding) >= MAX_BINARY:
                        self.as_real.append(k)
                        continue
                    coding[k] = (ab[0], ab[1] - ab[0])
        while True:
            self.bins = list(coding)
            self.loc, self.sc, const, self.ts = _standardise(n, expo, target, coding, closed)
            self.U = _binary_block(n, expo, self.ts, self.bins, rng)
            if self.U is not None:
                break
            # no cell table found in time: keep the first K binaries (their cells are determined)
            keep = min(K, len(self.bins) - 1)
            self.as_real += self.bins[keep:]
            coding = {k: coding[k] for k in self.bins[:keep]}
        self.detected = [k for k in self.bins if k not in declared]
        self.binary01 = [k for k in self.bins if coding[k] == (0.0, 1.0)]
        binset = set(self.bins)
        self.const = [k for k in range(d) if const[k] and k not in binset]
        others = [k for k in range(d) if k not in binset and k not in self.const]
        # -- exact polynomial relations (squares, interactions, affine dependence)
        cand = [k for k in others if k not in nonneg]
        if K < 4 and others and self._well_conditioned(others, idx):
            # below order 4 only affine relations can be read off, and there are none when the columns'
            # covariance (given the binaries) is non-singular: skip the search (most groups, most time)
            self.derived = []
        else:
            self.derived = _find_derived(n, expo, self.ts, binset, cand, self.bins + others)[::-1]  # eval order
        dset = {w for w, _, _ in self.derived}
        self.base = [k for k in others if k not in dset]
        q = len(self.base)
        # -- degree ≤ 2 closed form for the base columns: Z = [1, U], X = Zβ + E, EᵀE = W
        self.Z = np.column_stack([np.ones(n), self.U])
        C = np.array([[self.ts[idx[unit(d, k)]] for k in self.base]]
                     + [[self.ts[idx[unit(d, j, k)]] for k in self.base] for j in self.bins],
                     dtype=float).reshape(1 + len(self.bins), q)
        G = np.array([[self.ts[idx[unit(d, k, l)]] for l in self.base] for k in self.base]).reshape(q, q)
        ZtZ_pinv = np.linalg.pinv(self.Z.T @ self.Z, rcond=1e-12, hermitian=True)
        self.beta = ZtZ_pinv @ C
        W = G - C.T @ ZtZ_pinv @ C
        self.W = (W + W.T) / 2
        Uz, sz, _ = np.linalg.svd(self.Z, full_matrices=False)
        self.Qz = Uz[:, sz > 1e-10 * sz[0]]
        self.lower = np.array([(-self.loc[k] / self.sc[k]) if k in nonneg else -np.inf for k in self.base])
        self._effective_system()

    def _well_conditioned(self, cols, idx) -> bool:
        """Whether the within-binary-cell covariance of ``cols`` (from the moments) is clearly non-singular."""
        d = self.d
        Z = np.column_stack([np.ones(self.n), self.U])
        C = np.array([[self.ts[idx[unit(d, k)]] for k in cols]]
                     + [[self.ts[idx[unit(d, j, k)]] for k in cols] for j in self.bins],
                     dtype=float).reshape(1 + len(self.bins), len(cols))
        G = np.array([[self.ts[idx[unit(d, k, l)]] for l in cols] for k in cols]).reshape(len(cols), len(cols))
        W = G - C.T @ np.linalg.pinv(Z.T @ Z, rcond=1e-12, hermitian=True) @ C
        dg = np.diag(W)
        if np.any(dg <= 1e-12 * self.n):
            return False
        R = W / np.sqrt(np.outer(dg, dg))
        return bool(np.linalg.eigvalsh((R + R.T) / 2)[0] > 1e-8)

    def _effective_system(self):
        """The moment equations in the effective monomials (:mod:`.effective`) and the Jacobian's tables."""
        rows = expand(self.expo, self.bins, self.base, self.const, self.derived)
        Em, self.rscale, self.rmat, self.r0, rank = effective_sums(self.n, rows, self.expo, self.ts, self.U,
                                                                   self.bins, self.base)
        self.Eeff = Em
        self.unknowns, self.equations = self.n * len(self.base), rank
        self.didx, self.ext, self.dcoef = derivative_tables(Em, self.base, self.rscale)

    # --- coordinates ---
    def internal_rows(self, Xs: np.ndarray) -> np.ndarray:
        """All columns in internal coordinates from the base unknowns Xs (n, q)."""
        V = np.zeros((self.n, self.d))
        V[:, self.bins] = self.U
        V[:, self.base] = Xs
        for w, phi, beta in self.derived:
            V[:, w] = mono_values(V, phi) @ beta
        return V

    def assemble(self, Xs: np.ndarray) -> np.ndarray:
        """Rows on the original scale."""
        return self.loc + self.sc * self.internal_rows(Xs)

    def errors(self, Xs) -> np.ndarray:
        return relative_errors(self.assemble(Xs), self.expo, self.target, binary=self.binary01)

    def feasible(self, Xs) -> bool:
        return bool(np.all(Xs >= self.lower[None, :] - 1e-12 * (1 + np.abs(self.lower[None, :]))))

    # --- step 3: degrees ≤ 2, closed form ---
    def closed_form(self, rng: np.random.Generator) -> np.ndarray:
        n, q = self.n, len(self.base)
        R = rng.standard_normal((n, q))
        R -= self.Qz @ (self.Qz.T @ R)
        U, s, _ = np.linalg.svd(R, full_matrices=False)
        U = U[:, s > 1e-8 * s[0]] if s.size and s[0] > 0 else U[:, :0]
        L = _psd_factor(self.W)
        r = min(U.shape[1], L.shape[1])
        return self.Z @ self.beta + U[:, :r] @ L[:, :r].T

    def reproject(self, Xs: np.ndarray) -> np.ndarray | None:
        """Affine map of the Z-residual of Xs, closest to the identity, that makes the moments of degree ≤ 2
        of the base columns exact: E → E T with Tᵀ(EᵀE)T = W.  None when EᵀE is singular."""
        E = Xs - self.Qz @ (self.Qz.T @ Xs)
        if E.shape[1] == 0:
            return self.Z @ self.beta
        Ge = E.T @ E
        lam = np.linalg.eigvalsh(Ge)
        if lam[0] <= 1e-10 * max(lam[-1], 1e-300):
            return None
        Gh, Gih = _sym_pow(Ge, 0.5), _sym_pow(Ge, -0.5)
        mid = Gh @ self.W @ Gh
        lm, Q = np.linalg.eigh((mid + mid.T) / 2)
        root = (Q * np.sqrt(np.clip(lm, 0.0, None))) @ Q.T
        return self.Z @ self.beta + E @ (Gih @ root @ Gih)

    # --- step 4: degrees 3 .. K, nonlinear least squares ---
    def _eval(self, x: np.ndarray):
        """Scaled residuals at the flat base unknowns x, and the monomial values F (for the Jacobian)."""
        V = np.zeros((self.n, self.d))
        V[:, self.bins] = self.U
        V[:, self.base] = x.reshape(self.n, -1)
        F = mono_values(V, self.ext)
        s = F[:, :len(self.Eeff)].sum(axis=0) / self.rscale
        return (s if self.rmat is None else self.rmat @ s) - self.r0, F

    def _jac(self, F: np.ndarray) -> np.ndarray:
        """Dense Jacobian (n_eq, n · q) of the scaled residuals."""
        D = F[:, self.didx] * self.dcoef[None]                # (n, q, n_eff)
        J = np.ascontiguousarray(D.transpose(2, 0, 1)).reshape(len(self.Eeff), -1)
        return J if self.rmat is None else self.rmat @ J

    def _bounds_flat(self):
        return np.repeat(self.lower[None, :], self.n, axis=0).ravel()

    def solve_lm(self, X0: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
        """Step 4 by Levenberg-Marquardt with Nielsen's damping update.

        With more unknowns than equations the step solves (JJᵀ + μI) w = r, δ = −Jᵀw (the minimum-norm
        damped Gauss-Newton step: an n_eq × n_eq Cholesky instead of an SVD of the wide Jacobian), else
        (JᵀJ + μI) δ = −Jᵀr -- the same step.  Bounded (nonneg) entries are parametrised as x = lb + u²."""
        lb = self._bounds_flat()
        bnd = np.isfinite(lb)
        u = X0.ravel().copy()
        u[bnd] = np.sqrt(np.maximum(u[bnd] - lb[bnd], 1e-4))

        def to_x(u):
            x = u.copy()
            x[bnd] = lb[bnd] + u[bnd] ** 2
            return x

        r, F = self._eval(to_x(u))
        f = float(r @ r)
        stop = 1e-3 * tol
        mu, nu = None, 2.0
        hist = []
        for it in range(max_iter):
            if np.max(np.abs(r), initial=0.0) <= stop:
                break
            hist.append(f)
            if it >= 40 and f > 0.5 * hist[-31]:     # stalled (a local minimum): let a restart try
                break
            J = self._jac(F)
            if bnd.any():
                J[:, bnd] *= 2.0 * u[bnd]
            dual = J.shape[1] >= J.shape[0]
            A = J @ J.T if dual else J.T @ J
            g = J.T @ r
            if mu is None:
                mu = 1e-3 * max(float(np.max(np.diag(A), initial=0.0)), 1e-300)
            eye = np.eye(A.shape[0])
            while True:
                try:                         # numpy only here: no second BLAS thread pool (scipy's)
                    L = np.linalg.cholesky(A + mu * eye)
                    z = np.linalg.solve(L.T, np.linalg.solve(L, r if dual else g))
                    delta = -(J.T @ z) if dual else -z
                except np.linalg.LinAlgError:
                    mu, nu = mu * nu, nu * 2.0
                    continue
                r_new, F_new = self._eval(to_x(u + delta))
                f_new = float(r_new @ r_new)
                pred = f - float(np.sum((r + J @ delta) ** 2))
                if np.isfinite(f_new) and f_new < f and pred > 0:
                    rho = (f - f_new) / pred
                    mu *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                    nu = 2.0
                    break
                mu, nu = mu * nu, nu * 2.0
                if mu > 1e30 or not np.isfinite(mu):
                    return to_x(u).reshape(self.n, -1)          # no further progress possible
            small = np.linalg.norm(delta) <= 1e-15 * (np.linalg.norm(u) + 1e-15)
            u, r, F, f = u + delta, r_new, F_new, f_new
            if small:
                break
        return to_x(u).reshape(self.n, -1)


def _generate_group(n, expo, target, binary, nonneg, rng, tol, max_tries, max_iter):
    """:func:`generate_group` with its diagnostics: ``(V, error, info)``.  ``info`` has ``n``,
    ``max_rel_error``, ``tries``, ``binary`` (generated 0/1 or two-valued), ``binary_detected``,
    ``binary_as_real``, ``constant``, ``derived``, ``unknowns``, ``equations``, ``over_determined`` and
    ``seconds``."""
    t0 = time.perf_counter()
    expo = _check_expo(expo)
    d = expo.shape[1]
    target = np.asarray(target, dtype=float)
    if target.shape != (len(expo),) or not np.all(np.isfinite(target)):
        raise ValueError(f"target must be a finite vector of length {len(expo)}")
    if n != int(n) or int(n) < 0:
        raise ValueError("n must be a non-negative integer")
    n = int(n)
    declared = [int(k) for k in dict.fromkeys(binary)]
    nonneg = {int(k) for k in nonneg}
    for k in declared + sorted(nonneg):
        if not 0 <= k < d:
            raise ValueError(f"variable index {k} out of range for d = {d}")
    if n == 0:
        V = np.zeros((0, d))
        err = float(np.max(relative_errors(V, expo, target), initial=0.0))
        info = {"n": 0, "max_rel_error": err, "tries": 0, "binary": [], "binary_detected": [],
                "binary_as_real": [], "constant": [], "derived": [], "unknowns": 0, "equations": 0,
                "over_determined": False, "seconds": time.perf_counter() - t0}
        return V, err, info
    g = _Group(n, expo, target, declared, nonneg, rng)
    if g.as_real and any(k in declared for k in g.as_real):
        warnings.warn(f"binary variables {[k for k in g.as_real if k in declared]} are matched as real "
                      f"variables: more than MAX_BINARY = {MAX_BINARY} binaries, or no table of their joint "
                      "counts was found in time", PseudoDataWarning, stacklevel=3)
    K = int(expo.sum(axis=1).max())
    best, best_err, tries = None, np.inf, 0
    for attempt in range(max(1, max_tries)):
        tries = attempt + 1
        X = g.closed_form(rng)
        if g.base and (K > 2 or not g.feasible(X)):
            X = g.solve_lm(X, tol, max_iter)
            Xr = g.reproject(X)
            if Xr is not None and g.feasible(Xr):
                if g.errors(Xr).max(initial=0.0) <= max(g.errors(X).max(initial=0.0), tol):
                    X = Xr
        err = float(g.errors(X).max(initial=0.0)) if g.feasible(X) else np.inf
        if err < best_err:
            best, best_err = X, err
        if best_err <= tol:
            break
    if best is None:                          # never feasible: clip the last attempt
        best = np.maximum(X, g.lower[None, :])
        best_err = float(g.errors(best).max(initial=0.0))
    V = g.assemble(best)
    V[:, g.binary01] = g.U[:, [g.bins.index(k) for k in g.binary01]]      # exact 0/1, no rounding
    nn = sorted(nonneg)
    V[:, nn] = np.maximum(V[:, nn], 0.0)                                   # rounding-level negatives
    best_err = float(relative_errors(V, expo, target, binary=g.binary01).max(initial=0.0))
    info = {"n": n, "max_rel_error": best_err, "tries": tries, "binary": list(g.bins),
            "binary_detected": list(g.detected), "binary_as_real": list(g.as_real), "constant": list(g.const),
            "derived": [int(w) for w, _, _ in g.derived], "unknowns": g.unknowns, "equations": g.equations,
            "over_determined": g.unknowns < g.equations, "seconds": time.perf_counter() - t0}
    return V, best_err, info


def generate_group(n: int, expo: np.ndarray, target: np.ndarray, *, binary: Sequence[int] = (),
                   nonneg: Sequence[int] = (), rng: np.random.Generator, tol: float = 1e-9,
                   max_tries: int = 6, max_iter: int = 200) -> tuple[np.ndarray, float]:
    """Pseudo rows ``V`` (n, d) with ``moment_sums(V, expo) ≈ target``, and the achieved largest relative error.

    ``expo`` is ``monomials(d, K)`` (or any subset containing every monomial of degree ≤ 2).  Variables in
    ``binary`` are exactly 0/1 with exactly ``round(target[e_k])`` ones (at most :data:`MAX_BINARY`);
    ``nonneg`` variables are ≥ 0.  The error is the largest of :func:`fedglmm.model.moments.relative_errors`.
    Up to ``max_tries`` starts are tried until it is ``≤ tol`` and the best is returned; each least-squares
    solve takes at most ``max_iter`` iterations.
    """
    V, err, _ = _generate_group(n, expo, target, binary, nonneg, rng, tol, max_tries, max_iter)
    return V, err
