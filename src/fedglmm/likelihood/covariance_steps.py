"""Steps of the coordinator's Newton iteration taken in the entries of the random-effect covariance
Σ = ΛΛᵀ instead of those of its Cholesky factor Λ (θ, lme4's parameters).

Why: near a nearly singular covariance -- a correlation close to ±1, or an SD close to 0 -- the objective
is far from quadratic in θ.  A term's Σ depends on θ quadratically, and where its optimum is nearly
singular the valley of the objective curves through θ (for ``(1 + x | g)`` with correlation −0.98, along
the path Σ₁₂ and Σ₂₂ stay put while Λ₂₁ and Λ₂₂ swing together) and Newton in θ covers a third of the way
per round.  In Σ's entries the valley is straight and the quadratic model holds much further.  A scalar
term's Σ is θ²: the step in θ's square.

:class:`CovarianceSteps` maps x = (β, θ, ψ) to y = (β, σ, ψ), σ the entries of Σ at θ's places (the map is
one-to-one where Σ is positive definite: θ is the Cholesky factor of Σ), and takes the Newton step in y
with the chain rule: g_y = Jᵀg, H_y = JᵀHJ + Σ_k g_k ∂²x_k/∂y∂y, J = ∂x/∂y -- J and the second
derivatives by central differences of the map (q × q Cholesky factors, no round, no site).

Where Σ's optimum is singular, Σ's entries leave the positive-definite cone on the way and that step
fails; :class:`ReversedSteps` then takes it in the Cholesky factor of Σ with its effects in reverse order
(:meth:`CovarianceSteps.step_or_reversed`).
"""
from __future__ import annotations

import numpy as np

from ..model.spec import lambda_matrix, theta_index

TURNS = (0.25, 0.6, 0.9)    # the angles (radians) by which a row of Λ is turned off a saddle at a singular Σ


class CovarianceSteps:
    """The θ block x[p : p + k] of the parameters in Σ's entries (``mask``: Λ's pattern, as in the model)."""

    def __init__(self, mask, p: int):
        self.mask = np.asarray(mask, bool)
        self.q = self.mask.shape[0]
        self.index = theta_index(self.mask)
        self.p, self.k = p, len(self.index[0])
        self.off = ~np.tril(self.mask)
        self.diagonal = p + np.flatnonzero(self.index[0] == self.index[1])   # positions in x of Λ's diagonal

    def conditional_share(self, x: np.ndarray) -> np.ndarray:
        """For each diagonal entry of Λ (in the order of ``diagonal``): |Λ_rr| / ‖row r of Λ‖, the share of
        effect r's SD not explained by the effects before it (small: Σ close to singular)."""
        lam = lambda_matrix(x[self.p:self.p + self.k], self.q, self.index)
        rows = self.index[0][self.diagonal - self.p]
        norms = np.linalg.norm(lam[rows], axis=1)
        return np.abs(lam[rows, rows]) / np.where(norms > 0, norms, 1.0)

    def to_inner(self, x: np.ndarray) -> np.ndarray:
        lam = lambda_matrix(x[self.p:self.p + self.k], self.q, self.index)
        y = np.array(x, float)
        y[self.p:self.p + self.k] = (lam @ lam.T)[self.index]
        return y

    def from_inner(self, y: np.ndarray) -> np.ndarray | None:
        """x of y, or None where Σ is not positive definite or its factor leaves Λ's pattern."""
        low = np.zeros((self.q, self.q))
        low[self.index] = y[self.p:self.p + self.k]
        sigma = low + np.tril(low, -1).T
        try:
            lam = np.linalg.cholesky(sigma)
        except np.linalg.LinAlgError:
            return None
        if np.any(np.abs(lam[self.off]) > 1e-10 * max(1.0, float(np.max(np.abs(lam))))):
            return None
        x = np.array(y, float)
        x[self.p:self.p + self.k] = lam[self.index]
        return x

    def _chain(self, y0: np.ndarray, g: np.ndarray):
        """J = ∂x/∂y and Σ_k g_k ∂²x_k/∂y∂y on the θ block at y0, by central differences (None off the
        positive-definite cone)."""
        th = slice(self.p, self.p + self.k)
        h = 1e-4 * np.maximum(np.abs(y0[th]), 1e-3)
        x0 = self.from_inner(y0)
        if x0 is None:
            return None
        J, D = np.zeros((self.k, self.k)), np.zeros((self.k, self.k))

        def at(*moves):
            y = y0.copy()
            for i, s in moves:
                y[self.p + i] += s * h[i]
            x = self.from_inner(y)
            return None if x is None else x[th]

        psi0 = g[th] @ x0[th]
        for i in range(self.k):
            up, down = at((i, 1)), at((i, -1))
            if up is None or down is None:
                return None
            J[:, i] = (up - down) / (2.0 * h[i])
            D[i, i] = (g[th] @ up - 2.0 * psi0 + g[th] @ down) / h[i] ** 2
            for j in range(i):
                c = [at((i, a), (j, b)) for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
                if any(v is None for v in c):
                    return None
                D[i, j] = D[j, i] = g[th] @ (c[0] - c[1] - c[2] + c[3]) / (4.0 * h[i] * h[j])
        return J, D

    def model(self, x: np.ndarray, g: np.ndarray, H: np.ndarray):
        """(y, g_y, H_y, J) of the quadratic model in y at x, or None (also where x has no finite y)."""
        y0 = self.to_inner(x)
        chain = self._chain(y0, g) if np.all(np.isfinite(y0)) else None
        if chain is None:
            return None
        Jt, D = chain
        th = slice(self.p, self.p + self.k)
        J = np.eye(len(x))
        J[th, th] = Jt
        Hy = J.T @ H @ J
        Hy[th, th] += D
        return y0, J.T @ g, Hy, J

    def step(self, x: np.ndarray, g: np.ndarray, H: np.ndarray, m=None):
        """The Newton step in y, as a step in x, and its predicted decrease; None where the model in y is
        not convex or the step leaves the positive-definite cone (even halved twice); ``m``: :meth:`model`'s
        result at x if already at hand."""
        m = self.model(x, g, H) if m is None else m
        if m is None:
            return None
        y0, gy, Hy, _ = m
        try:
            np.linalg.cholesky(Hy)
            dy = -np.linalg.solve(Hy, gy)
        except np.linalg.LinAlgError:
            return None
        for _ in range(3):
            xn = self.from_inner(y0 + dy)
            if xn is not None:
                return xn - x, float(-(gy @ dy + 0.5 * dy @ Hy @ dy))
            dy = 0.5 * dy
        return None

    def step_or_reversed(self, x: np.ndarray, g: np.ndarray, H: np.ndarray):
        """:meth:`step`, or where it fails (off the cone: Σ's optimum singular) the Newton step in the
        Cholesky factor of Σ with its effects reversed (:class:`ReversedSteps`); None if both fail."""
        st = self.step(x, g, H)
        if st is None:
            self._reversed = getattr(self, "_reversed", None) or ReversedSteps(self.mask, self.p)
            st = self._reversed.step(x, g, H)
        return st

    def turns(self, x: np.ndarray, pos: int | None, angles=TURNS) -> list[np.ndarray]:
        """Steps off a singular Σ that F's curvature leaves: where a diagonal entry Λ_rr (at ``pos`` in x, from
        :meth:`saddle`) is 0 and F curves down along the turn below (a saddle of F, when the rest is at its
        optimum), row r of Λ turned off the face at its length by each of ``angles`` φ -- Λ_rr = ‖row‖ sin φ,
        the row's other entries times cos φ -- and the block of Λ before r divided by cos φ: effect r's
        variance and its covariances with the effects before it stay, their variances grow (the conditional SD
        of the effect before it, in :class:`ReversedSteps`' terms, leaves 0).  That is the valley out of such a
        saddle, and it is long: correlation −1 at the saddle against −0.79 and −0.69 at the optimum
        (stress_methods seeds 7 and 3), where the trust-region steps in θ, straight and short, took 5-8 rounds
        to get out.

        Where H is positive definite such a saddle may hide from H_rr, which also holds the row's lengthening:
        where F is steep in the row's length (H in it ~10⁴ times that along the turn) a gradient in it of 1e-2
        made H_rr +0.012 at a saddle whose curvature along the turn is −0.013 (stress_methods seed 40 fit 20).
        There :meth:`saddle` takes F's curvature along the row turned at its length, Λ₁₁ held: the length's
        error hardly moves it, and for (1 + x | g) it is −Σ₁₂ ∂F/∂Σ₁₂, whose sign at the face's optimum is the
        saddle's (F falling as the correlation leaves ±1).  Along the turn above (Σ₁₂ kept, Σ₁₁ grown) it is
        2Λ₁₁² ∂F/∂Σ₁₁, which a Λ₁₁ 0.06 % off its optimum turned negative at 7 of small_slope_rounds.py's
        fits whose optimum is on the face, each then a round longer.
        """
        return [self._turn(x, pos, phi) for phi in angles] if pos is not None else []

    def saddle(self, x: np.ndarray, g: np.ndarray, H: np.ndarray, least: float = 0.0, within=None) -> int | None:
        """The position in x of the first diagonal entry Λ_rr of Λ at 0 where F curves down off the face: H_rr < 0;
        or, with ``within`` (Λ_rr below that share of its row's norm counts as 0), F's curvature below −``least``
        along row r turned at its length with the rest held, ‖row‖² H_rr − g_rowᵀrow (:meth:`turns`); else
        None."""
        d = self.diagonal
        scale = max(1.0, float(np.max(np.abs(x[d])))) if d.size else 1.0
        for pos in d:
            row = self._row(pos)[0]
            n = float(np.linalg.norm(x[row]))
            if within is None:
                on, down = abs(x[pos]) <= 1e-8 * scale, H[pos, pos] < 0
            else:
                on, down = abs(x[pos]) <= within * n, n * n * H[pos, pos] - g[row] @ x[row] < -least
            if n > 0 and on and down:
                return int(pos)
        return None

    def _row(self, pos: int) -> tuple:
        """(row r's entries left of the diagonal, the block of Λ before r) as positions in x, for Λ_rr at ``pos``."""
        r = self.index[0][pos - self.p]
        row = self.p + np.flatnonzero((self.index[0] == r) & (self.index[1] < r))
        block = self.index[1][row - self.p]           # the effects before r in r's term
        return row, self.p + np.flatnonzero(np.isin(self.index[0], block) & np.isin(self.index[1], block))

    def _turn(self, x: np.ndarray, pos: int, phi: float) -> np.ndarray:
        row, before = self._row(pos)
        step = np.zeros_like(x)
        step[row] = x[row] * (np.cos(phi) - 1.0)
        step[pos] = float(np.linalg.norm(x[row])) * np.sin(phi) - x[pos]
        step[before] = x[before] * (1.0 / np.cos(phi) - 1.0)
        return step

    def predicted_gradient(self, x, g, H, other: np.ndarray, g_other: np.ndarray, m=None) -> np.ndarray | None:
        """The gradient in x at ``other`` that the quadratic model in y at x predicts (None off the cone);
        ``g_other`` (the gradient there) gives the second-order part of the map's chain rule there."""
        m = self.model(x, g, H) if m is None else m
        yo = self.to_inner(other)
        mo = self._chain(yo, g_other)
        if m is None or mo is None:
            return None
        y0, gy, Hy, _ = m
        Jo = np.eye(len(x))
        Jo[self.p:self.p + self.k, self.p:self.p + self.k] = mo[0]
        try:
            return np.linalg.solve(Jo.T, gy + Hy @ (yo - y0))
        except np.linalg.LinAlgError:
            return None


def _semidefinite_cholesky(sigma: np.ndarray) -> np.ndarray | None:
    """The lower Cholesky factor of a positive semi-definite ``sigma`` (a pivot within rounding of 0 is 0 and
    its column below it too); None where a pivot is clearly negative."""
    q = sigma.shape[0]
    lam = np.zeros_like(sigma)
    tol = 1e-12 * max(1.0, float(np.max(np.abs(np.diag(sigma)))))
    for j in range(q):
        d = sigma[j, j] - lam[j, :j] @ lam[j, :j]
        if d < -tol:
            return None
        if d <= tol:
            continue
        lam[j, j] = np.sqrt(d)
        lam[j + 1:, j] = (sigma[j + 1:, j] - lam[j + 1:, :j] @ lam[j, :j]) / lam[j, j]
    return lam


class ReversedSteps(CovarianceSteps):
    """The θ block as the Cholesky factor of Σ with its effects in reverse order (the slope's SD first, then
    the intercept's regression on the slope and its conditional SD).

    Why: where the first effect's SD goes to 0 and the others' do not, lme4's θ stops being identified --
    at Λ₁₁ = 0 only the length of the next row of Λ matters, not its direction -- and near there the
    objective in θ is a circle-shaped valley (the row turning at a constant length) or flat in two
    coordinates at once, where Newton in θ crawls for tens of rounds (stress_methods seeds 4 and 5: 36 and
    42) and Σ's entries leave the positive-definite cone.  Reversed, the vanishing SD is the last
    diagonal entry, where F is even and smooth, and its regression coefficient a coordinate like any other."""

    def __init__(self, mask, p: int):
        super().__init__(mask, p)
        self.order = np.arange(self.q)[::-1]
        sym = np.tril(self.mask) | np.tril(self.mask).T
        self.rmask = np.tril(sym[np.ix_(self.order, self.order)])
        self.rindex = theta_index(self.rmask)
        self.ok = len(self.rindex[0]) == self.k and bool(np.any(np.tril(self.mask, -1)))   # (a block of ≥ 2)

    def to_inner(self, x: np.ndarray) -> np.ndarray:
        lam = lambda_matrix(x[self.p:self.p + self.k], self.q, self.index)
        sigma = (lam @ lam.T)[np.ix_(self.order, self.order)]
        rlam = _semidefinite_cholesky(sigma)
        y = np.array(x, float)
        y[self.p:self.p + self.k] = (rlam if rlam is not None else np.full_like(sigma, np.nan))[self.rindex]
        return y

    def from_inner(self, y: np.ndarray) -> np.ndarray | None:
        rlam = lambda_matrix(y[self.p:self.p + self.k], self.q, self.rindex)
        back = np.argsort(self.order)
        lam = _semidefinite_cholesky((rlam @ rlam.T)[np.ix_(back, back)])
        if lam is None or np.any(np.abs(lam[self.off]) > 1e-10 * max(1.0, float(np.max(np.abs(lam))))):
            return None
        x = np.array(y, float)
        x[self.p:self.p + self.k] = lam[self.index]
        return x

    def model(self, x: np.ndarray, g: np.ndarray, H: np.ndarray):
        return super().model(x, g, H) if self.ok else None

    def step(self, x: np.ndarray, g: np.ndarray, H: np.ndarray, m=None):
        """:meth:`CovarianceSteps.step`, with the new Λ's columns signed as x's (F is the same either way;
        the factor found has a non-negative diagonal)."""
        st = super().step(x, g, H, m)
        if st is None:
            return None
        th = slice(self.p, self.p + self.k)
        sign = np.where(np.diag(lambda_matrix(x[th], self.q, self.index)) < 0, -1.0, 1.0)
        step = st[0].copy()
        step[th] = (x[th] + step[th]) * sign[self.index[1]] - x[th]
        return step, st[1]
