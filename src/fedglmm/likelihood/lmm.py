"""Exact linear mixed model likelihood from sums, with analytic θ-derivatives.

For group i, y_i ~ N(X_i β, σ² V_i), V_i = I + Z_i Σ Z_iᵀ with Σ = ΛΛᵀ the covariance of the random
effects relative to σ² (lme4's parametrisation).  With the per-group cross-products P_i = ZᵢᵀZᵢ,
Q_i = ZᵢᵀXᵢ, r_i = Zᵢᵀyᵢ, Woodbury gives V_i⁻¹ = I − Z_i K_i Z_iᵀ, K_i = Σ(I + P_iΣ)⁻¹, and

    A(θ) = Σ XᵀV⁻¹X = XᵀX − Σ_i Q_iᵀ K_i Q_i,    b(θ) = XᵀV⁻¹y = Xᵀy − Σ_i Q_iᵀ K_i r_i,
    c(θ) = yᵀV⁻¹y = yᵀy − Σ_i r_iᵀ K_i r_i,       d(θ) = Σ_i log det V_i = Σ_i log det(I + P_iΣ).

These four are sums over groups, hence over sites.  Precision weights w (row variance σ²/w, lmer's
``weights``) scale each row of y, X and Z by √w; n counts the rows with w > 0, and the log-likelihood gains
½ Σ log w (sent once, in the set-up reply: :func:`fedglmm.likelihood.setup.log_weights`).  The coordinator profiles β and σ out:
β̂ = A⁻¹b, RSS = c − bᵀβ̂, and (Laird & Ware; Bates et al. 2015, J. Stat. Softw. 67(1), eq. 34 and 41)

    −2ℓ_ML(θ)   = d + n (1 + log(2π RSS / n)),
    −2ℓ_REML(θ) = d + log det A + (n − p)(1 + log(2π RSS / (n − p))).

Sites send A, b, c, d with their first and second θ-derivatives, obtained from
dK = E dΣ Eᵀ, E = I − KP, d log det(I + PΣ) = tr(PE dΣ), and the second-order terms below, so the
coordinator takes exact Newton steps in θ.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.spec import Design, lambda_matrix, theta_index


class LMMSums:
    """One site's per-group cross-products, and the θ-functions A, b, c, d with derivatives."""

    def __init__(self, design: Design, X: np.ndarray | None = None):
        X = np.asarray(design.X if X is None else X, float)
        y = np.asarray(design.y, float) - np.asarray(design.offset, float)
        Z = np.asarray(design.Z, float)
        self.n, self.p = X.shape
        if getattr(design, "weighted", False):
            w = np.asarray(design.trials, float)
            r = np.sqrt(w)
            X, y, Z, self.n = X * r[:, None], y * r, Z * r[:, None], int(np.sum(w > 0))
        self.q = Z.shape[1]
        self.theta_r, self.theta_c = theta_index(design.theta_mask)
        self.ntheta = len(self.theta_r)
        self.XtX, self.Xty, self.yty = X.T @ X, X.T @ y, float(y @ y)
        if self.q:
            s = design.starts
            self.P = np.add.reduceat(Z[:, :, None] * Z[:, None, :], s, axis=0)
            self.Q = np.add.reduceat(Z[:, :, None] * X[:, None, :], s, axis=0)
            self.r = np.add.reduceat(Z * y[:, None], s, axis=0)

    @classmethod
    def from_blocks(cls, n, XtX, Xty, yty, P, Q, r, theta_mask):
        """Build from per-group cross-products directly (summary-statistics route)."""
        self = cls.__new__(cls)
        self.n, self.p = int(n), XtX.shape[0]
        self.q = P.shape[1] if P.ndim == 3 else 0
        self.theta_r, self.theta_c = theta_index(theta_mask)
        self.ntheta = len(self.theta_r)
        self.XtX, self.Xty, self.yty = XtX, Xty, float(yty)
        self.P, self.Q, self.r = P, Q, r
        return self

    def lam(self, theta):
        return lambda_matrix(theta, self.q, (self.theta_r, self.theta_c))

    def evaluate(self, theta: np.ndarray, order: int = 2) -> dict:
        """A, b, c, d at θ and, for order ≥ 1 / 2, their first / second θ-derivatives."""
        out = {"n": self.n, "A": self.XtX.copy(), "b": self.Xty.copy(), "c": self.yty, "d": 0.0}
        k = self.ntheta
        if self.q == 0:
            return out
        lam = self.lam(np.asarray(theta, float))
        sig = lam @ lam.T
        I = np.eye(self.q)
        K = np.linalg.solve((I + self.P @ sig).transpose(0, 2, 1), sig)   # Σ (I + PΣ)⁻¹ (symmetric)
        K = 0.5 * (K + K.transpose(0, 2, 1))
        E = I - K @ self.P
        Q, r = self.Q, self.r
        out["A"] -= np.einsum("gap,gab,gbs->ps", Q, K, Q)
        out["b"] -= np.einsum("gap,gab,gb->p", Q, K, r)
        out["c"] -= float(np.einsum("ga,gab,gb->", r, K, r))
        out["d"] = float(np.sum(np.linalg.slogdet(I + self.P @ sig)[1]))
        if order < 1 or k == 0:
            return out
        # dΣ_t = Λ_t Λᵀ + Λ Λ_tᵀ with Λ_t = e_r e_cᵀ
        dsig = np.zeros((k, self.q, self.q))
        for t in range(k):
            dsig[t, self.theta_r[t], :] += lam[:, self.theta_c[t]]
        dsig = dsig + dsig.transpose(0, 2, 1)
        EdE = np.einsum("gab,tbc,gdc->gtad", E, dsig, E)                      # E dΣ_t Eᵀ = dK_t
        PE = self.P @ E                                                         # = EᵀP (symmetric)
        out["dA"] = -np.einsum("gap,gtab,gbs->tps", Q, EdE, Q)
        out["db"] = -np.einsum("gap,gtab,gb->tp", Q, EdE, r)
        out["dc"] = -np.einsum("ga,gtab,gb->t", r, EdE, r)
        out["dd"] = np.einsum("gab,tba->t", PE, dsig)
        if order < 2:
            return out
        # d²Σ_st = [c_s = c_t](e_{r_s} e_{r_t}ᵀ + e_{r_t} e_{r_s}ᵀ)
        d2sig = np.zeros((k, k, self.q, self.q))
        for s in range(k):
            for t in range(k):
                if self.theta_c[s] == self.theta_c[t]:
                    d2sig[s, t, self.theta_r[s], self.theta_r[t]] += 1.0
                    d2sig[s, t, self.theta_r[t], self.theta_r[s]] += 1.0
        # d²K_st = E d²Σ_st Eᵀ − E dΣ_t PE dΣ_s Eᵀ − E dΣ_s PE dΣ_t Eᵀ
        Ed = np.einsum("gab,tbc->gtac", E, dsig)                                # E dΣ_t
        dEt = np.einsum("gtab,gbc,scd,gfd->gtsaf", Ed, PE, dsig, E)             # E dΣ_t PE dΣ_s Eᵀ
        d2K = np.einsum("gab,stbc,gdc->gstad", E, d2sig, E) - dEt - dEt.transpose(0, 2, 1, 3, 4)
        out["d2A"] = -np.einsum("gap,gstab,gbr->stpr", Q, d2K, Q)
        out["d2b"] = -np.einsum("gap,gstab,gb->stp", Q, d2K, r)
        out["d2c"] = -np.einsum("ga,gstab,gb->st", r, d2K, r)
        # d² log det = tr(PE d²Σ_st) − tr(PE dΣ_t PE dΣ_s)
        PEd = np.einsum("gab,tbc->gtac", PE, dsig)
        out["d2d"] = np.einsum("gab,stba->st", PE, d2sig) - np.einsum("gtab,gsba->ts", PEd, PEd)
        return out

    def conditional_modes(self, theta, beta, sigma):
        """Conditional means b̂_i = K_i (r_i − Q_i β̂) on the data scale, and conditional SDs σ sqrt(diag K_i)."""
        lam = self.lam(np.asarray(theta, float))
        sig = lam @ lam.T
        I = np.eye(self.q)
        K = np.linalg.solve((I + self.P @ sig).transpose(0, 2, 1), sig)
        b = np.einsum("gab,gb->ga", K, self.r - self.Q @ beta)
        return b, sigma * np.sqrt(np.maximum(np.diagonal(K, axis1=1, axis2=2), 0.0))

    # --- the engine interface (see :mod:`fedglmm.likelihood.engine`) ------------------------------
    def sums(self, point: np.ndarray, final: bool = False) -> dict:
        """A, b, c, d and their first and second θ-derivatives at θ, as the site sends them."""
        return self.evaluate(point, order=2)

    def modes(self, point: np.ndarray, beta=None, sigma=None) -> tuple[np.ndarray, np.ndarray]:
        """Each group's conditional means and SDs at θ, given the profiled β̂ (internal scale) and σ̂."""
        return self.conditional_modes(point, np.asarray(beta), float(sigma))


@dataclass
class Profiled:
    """The profiled criterion and what comes with it (see :func:`profiled_deviance`)."""

    dev: float
    grad: np.ndarray
    hess: np.ndarray | None
    beta: np.ndarray
    sigma2: float
    dbeta: np.ndarray | None = None      # dβ̂/dθ_t, one row per θ_t
    dsigma2: np.ndarray | None = None    # dσ̂²/dθ_t


def profiled_deviance(s: dict, reml: bool, order: int = 2) -> Profiled:
    """−2 × profiled (RE)ML log-likelihood from summed A, b, c, d, with θ-gradient and Hessian.

    ``s`` is the sum over sites of :meth:`LMMSums.evaluate`.
    """
    A, b, c, d, n = s["A"], s["b"], s["c"], s["d"], s["n"]
    p = len(b)
    cf = np.linalg.cholesky(A)
    beta = np.linalg.solve(A, b)
    rss = c - b @ beta
    dof = n - p if reml else n
    dev = d + dof * (1.0 + np.log(2.0 * np.pi * rss / dof))
    if reml:
        dev += 2.0 * np.sum(np.log(np.diag(cf)))
    sigma2 = rss / dof
    if order < 1 or "dA" not in s:
        k = len(s.get("dd", []))
        return Profiled(dev, np.zeros(k), np.zeros((k, k)), beta, sigma2)
    dA, db, dc, dd = s["dA"], s["db"], s["dc"], s["dd"]
    drss = dc - 2.0 * db @ beta + np.einsum("p,tpr,r->t", beta, dA, beta)
    grad = dd + dof * drss / rss
    Ainv = np.linalg.inv(A)
    dbeta = np.einsum("pr,tr->tp", Ainv, db - np.einsum("tpr,r->tp", dA, beta))   # dβ̂_t
    if reml:
        grad = grad + np.einsum("pr,trp->t", Ainv, dA)
    out = Profiled(dev, grad, None, beta, sigma2, dbeta, drss / dof)
    if order < 2:
        return out
    # −2 db_tᵀdβ̂_s + 2 β̂ᵀdA_t dβ̂_s = −2 dβ̂_tᵀ A dβ̂_s
    d2rss = s["d2c"] - 2.0 * np.einsum("stp,p->st", s["d2b"], beta) \
        + np.einsum("p,stpr,r->st", beta, s["d2A"], beta) - 2.0 * dbeta @ A @ dbeta.T
    hess = s["d2d"] + dof * (d2rss / rss - np.outer(drss, drss) / rss**2)
    if reml:
        AidA = np.einsum("pr,trs->tps", Ainv, dA)
        hess = hess + np.einsum("pr,strp->st", Ainv, s["d2A"]) - np.einsum("tps,usp->tu", AidA, AidA)
    out.hess = 0.5 * (hess + hess.T)
    return out
