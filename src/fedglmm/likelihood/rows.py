"""Per-row family arithmetic, a group's sums at its mode, and small linear algebra for the fused Laplace
kernel (:mod:`fedglmm.likelihood.kernel`), compiled by numba.

Each function here is the scalar form of the vectorised one in :mod:`fedglmm.model.families` (same
formulas, same branches, written in η to stay finite in the tails), so the kernel computes what the numpy
engine computes, up to the last bits of rounding.  A family plugs into the kernel by a code
(:data:`CODES`) and a branch in :func:`loglik_row`, :func:`d12_row` and :func:`all_row`.

log Φ (probit) follows the Faddeeva form ``scipy.special.log_ndtr`` uses: log1p(−erfc(x/√2)/2) for
x ≥ −1, log(erfc(−x/√2)/2) below, and for x < −37.5 (where erfc underflows) the asymptotic series of the
scaled complementary error function (Abramowitz & Stegun 7.1.23).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

LOGIT, PROBIT, CLOGLOG, LOG = 0, 1, 2, 3
#: (family, link) -> kernel code
CODES = {("binomial", "logit"): LOGIT, ("binomial", "probit"): PROBIT, ("binomial", "cloglog"): CLOGLOG,
         ("poisson", "log"): LOG}
_LOG2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT1_2 = math.sqrt(0.5)


@njit(cache=True)
def _pos(x):
    """max(x, 0) that keeps NaN, as numpy's maximum."""
    return x if (x > 0.0 or x != x) else 0.0


@njit(cache=True)
def _expit2(eta):
    """(μ, 1 − μ) for the logit link, each to full relative precision."""
    e = math.exp(-abs(eta))
    small = e / (1.0 + e)
    big = 1.0 / (1.0 + e)
    if eta >= 0:
        return big, small
    return small, big


@njit(cache=True)
def _xlogy(x, logv):
    return 0.0 if x == 0 else x * logv


@njit(cache=True)
def _log1mexp(t):
    """log(1 − e^−t), t > 0 (Mächler 2012)."""
    if t < _LOG2:
        return math.log(-math.expm1(-min(t, _LOG2)))
    return math.log1p(-math.exp(-max(t, _LOG2)))


@njit(cache=True)
def log_ndtr(x):
    """log Φ(x)."""
    t = x * _SQRT1_2
    if x >= -1.0:
        return math.log1p(-math.erfc(t) / 2.0)
    if x > -37.5:
        return math.log(math.erfc(-t) / 2.0)
    s = -t                                  # erfc(s) = e^(−s²) erfcx(s), erfcx(s) ≈ (1/(s√π)) Σ (−1)^k (2k−1)!!/(2s²)^k
    z = 1.0 / (2.0 * s * s)
    term, total = 1.0, 1.0
    for k in range(1, 12):
        term *= -(2 * k - 1) * z
        total += term
    return -s * s + math.log(total / (s * math.sqrt(math.pi)) / 2.0)


@njit(cache=True)
def _binomial_level(y, m):
    """A binomial row's log-density at μ = y/m (0 for a 0/1 row), which the family's loglik leaves out."""
    if m == 1.0:
        return 0.0
    return (y * math.log(y / m) if y > 0 else 0.0) + ((m - y) * math.log((m - y) / m) if m > y else 0.0)


@njit(cache=True)
def loglik_row(code, y, m, eta):
    """log f(y | η) up to the family's constant (less its saturated value, as the family's loglik)."""
    if code == LOGIT:
        t = math.log1p(math.exp(-abs(eta)))
        return -(m * t + y * _pos(-eta) + (m - y) * _pos(eta)) - _binomial_level(y, m)
    if code == LOG:                          # m: the prior weight multiplying the row's log-likelihood
        # less its value at η = log y, as the family's loglik (its constant holds it)
        return m * ((y * (eta - math.log(y)) if y > 0 else 0.0) - (math.exp(eta) - y))
    if code == PROBIT:
        return _xlogy(y, log_ndtr(eta)) + _xlogy(m - y, log_ndtr(-eta)) - _binomial_level(y, m)
    t = math.exp(eta)
    return _xlogy(y, _log1mexp(t)) - (m - y) * t - _binomial_level(y, m)


@njit(cache=True)
def _probit_lams(eta):
    logphi = -0.5 * eta * eta - _HALF_LOG_2PI
    return math.exp(logphi - log_ndtr(eta)), math.exp(logphi - log_ndtr(-eta))


@njit(cache=True)
def _cloglog_terms(eta):
    t = math.exp(eta)
    em1 = math.expm1(t)
    a = t / em1
    b = t * t / (em1 * -math.expm1(-t))
    return t, a, b


@njit(cache=True)
def d12_row(code, y, m, eta):
    """(∂ℓ/∂η, ∂²ℓ/∂η²)."""
    if code == LOGIT:
        mu, cmu = _expit2(eta)
        d1 = (y - m) + m * cmu if eta > 0 else y - m * mu
        return d1, -(m * mu * cmu)
    if code == LOG:
        mu = m * math.exp(eta)
        return m * y - mu, -mu
    if code == PROBIT:
        lam1, lam0 = _probit_lams(eta)
        return y * lam1 - (m - y) * lam0, -y * lam1 * (eta + lam1) - (m - y) * lam0 * (lam0 - eta)
    t, a, b = _cloglog_terms(eta)
    return y * a - (m - y) * t, y * (a - b) - (m - y) * t


@njit(cache=True)
def all_row(code, expected, y, m, eta):
    """(ℓ, d1, d2, d3, w, w1, w2): the derivatives of ℓ in η and the Laplace curvature weight w with its
    first two η-derivatives (the Fisher weight if ``expected`` or the link is canonical, else −d2)."""
    if code == LOGIT:                       # one exponential for the log-density and the derivatives
        e = math.exp(-abs(eta))
        ll = -(m * math.log1p(e) + y * _pos(-eta) + (m - y) * _pos(eta)) - _binomial_level(y, m)
        small, big = e / (1.0 + e), 1.0 / (1.0 + e)
        mu, cmu = (big, small) if eta >= 0 else (small, big)
        d1 = (y - m) + m * cmu if eta > 0 else y - m * mu
        w = m * mu * cmu
        return ll, d1, -w, -w * (cmu - mu), w, w * (cmu - mu), w * (1.0 - 6.0 * mu * cmu)
    ll = loglik_row(code, y, m, eta)
    if code == LOG:
        mu = m * math.exp(eta)
        return ll, m * y - mu, -mu, -mu, mu, mu, mu
    if code == PROBIT:
        lam1, lam0 = _probit_lams(eta)
        d1 = y * lam1 - (m - y) * lam0
        d2 = -y * lam1 * (eta + lam1) - (m - y) * lam0 * (lam0 - eta)
        da1 = lam1 * (1.0 - (eta + lam1) * (eta + 2.0 * lam1))
        da0 = lam0 * ((lam0 - eta) * (2.0 * lam0 - eta) - 1.0)
        d3 = -y * da1 - (m - y) * da0
        if expected:
            w = m * lam1 * lam0
            k = lam0 - lam1 - 2.0 * eta
            return ll, d1, d2, d3, w, w * k, w * (k * k + lam0 * (lam0 - eta) + lam1 * (eta + lam1) - 2.0)
        dl1, dl0 = -lam1 * (eta + lam1), lam0 * (lam0 - eta)
        k1, k0 = 1.0 - (eta + lam1) * (eta + 2.0 * lam1), (lam0 - eta) * (2.0 * lam0 - eta) - 1.0
        dda1 = dl1 * k1 - lam1 * ((1.0 + dl1) * (eta + 2.0 * lam1) + (eta + lam1) * (1.0 + 2.0 * dl1))
        dda0 = dl0 * k0 + lam0 * ((dl0 - 1.0) * (2.0 * lam0 - eta) + (lam0 - eta) * (2.0 * dl0 - 1.0))
        return ll, d1, d2, d3, -d2, -d3, y * dda1 + (m - y) * dda0
    t, a, b = _cloglog_terms(eta)
    c = t / -math.expm1(-t)
    db = b * (2.0 - 2.0 * c + t)
    d1, d2 = y * a - (m - y) * t, y * (a - b) - (m - y) * t
    d3 = y * (a - b - db) - (m - y) * t
    if expected:
        return ll, d1, d2, d3, m * t * a, m * t * (2.0 * a - b), m * t * (4.0 * a - 3.0 * b - db)
    ddb = db * (2.0 - 2.0 * c + t) + b * (t - 2.0 * c * (1.0 - a))
    return ll, d1, d2, d3, -d2, -d3, -(y * (a - b - db - ddb) - (m - y) * t)


# --- a group's sums at its mode -------------------------------------------------------------------

@njit(cache=True)
def at_mode(code, expected, X, Z, y, m, s, n, u, eta, lam, D, gx, gu, S):
    """The group's sums at its mode.  D[j] = (d1, d2, d3, w, w1, w2); S = (H, hobs, cb, ztd1, md2z, N, Wzz,
    Sd, czx) and ``gx`` (Σ x d1, the gradient's part in β) and ``gu`` (∇h, for one more Newton step) are
    filled; the log-density total is returned.  Every sum in m = Λᵀz is Λ times one in z: the rows add
    only Wzz = Σ w z zᵀ, Sd = Σ d2 z zᵀ (upper triangles), czx = Σ d2 z xᵀ and ztd1 = Σ z d1, and
    H = I + ΛᵀWzzΛ, hobs = I − ΛᵀSdΛ, md2z = ΛᵀSd, N = WzzΛ, cb = Λᵀczx, ∇h = Λᵀztd1 − u follow."""
    H, hobs, cb, ztd1, md2z, N, Wzz, Sd, czx = S
    p, q = X.shape[1], Z.shape[1]
    for arr in (Wzz, Sd, czx):
        arr[:, :] = 0.0
    ztd1[:] = 0.0
    gx[:] = 0.0
    total = 0.0
    for j in range(n):
        r = s + j
        ll, d1, d2, d3, w, w1, w2 = all_row(code, expected, y[r], m[r], eta[j])
        total += ll
        D[j, 0], D[j, 1], D[j, 2], D[j, 3], D[j, 4], D[j, 5] = d1, d2, d3, w, w1, w2
        for a in range(q):
            za = Z[r, a]
            for b in range(a, q):
                zz = za * Z[r, b]
                Wzz[a, b] += w * zz
                Sd[a, b] += d2 * zz
            ztd1[a] += za * d1
            dz = d2 * za
            for kk in range(p):
                czx[a, kk] += dz * X[r, kk]
        for kk in range(p):
            gx[kk] += X[r, kk] * d1
    for a in range(q):
        for b in range(a):
            Wzz[a, b], Sd[a, b] = Wzz[b, a], Sd[b, a]
    mm(Wzz, lam, N)
    mm(lam.T, Sd, md2z)
    mm(lam.T, czx, cb)
    for a in range(q):
        acc = 0.0
        for c in range(q):
            acc += lam[c, a] * ztd1[c]
        gu[a, 0] = acc - u[a]
    mm(lam.T, N, H)
    mm(md2z, lam, hobs)
    for a in range(q):
        for b in range(q):
            hobs[a, b] = -hobs[a, b]
        H[a, a] += 1.0
        hobs[a, a] += 1.0
    return total


# --- q × q linear algebra ---------------------------------------------------------------------------

@njit(cache=True)
def mm(A, B, out):
    """out = A B for small matrices (A or B may be a transposed view), without a BLAS call per group."""
    for i in range(A.shape[0]):
        for j in range(B.shape[1]):
            acc = 0.0
            for c in range(A.shape[1]):
                acc += A[i, c] * B[c, j]
            out[i, j] = acc


@njit(cache=True)
def solve(A, B, out):
    """out = A⁻¹ B (A: q×q, B: q×k) by Gaussian elimination with partial pivoting; False if singular.
    For q = 1 this is B / A, as the numpy engine computes it."""
    q, k = B.shape
    a = A.copy()
    out[:, :] = B
    for i in range(q):
        piv = i
        for r in range(i + 1, q):
            if abs(a[r, i]) > abs(a[piv, i]):
                piv = r
        if a[piv, i] == 0.0 or a[piv, i] != a[piv, i]:
            return False
        if piv != i:
            for cc in range(q):
                a[i, cc], a[piv, cc] = a[piv, cc], a[i, cc]
            for cc in range(k):
                out[i, cc], out[piv, cc] = out[piv, cc], out[i, cc]
        for r in range(i + 1, q):
            f = a[r, i] / a[i, i]
            for cc in range(i, q):
                a[r, cc] -= f * a[i, cc]
            for cc in range(k):
                out[r, cc] -= f * out[i, cc]
    for i in range(q - 1, -1, -1):
        for cc in range(k):
            s = out[i, cc]
            for r in range(i + 1, q):
                s -= a[i, r] * out[r, cc]
            out[i, cc] = s / a[i, i]
    return True


@njit(cache=True)
def chol_logdet(H):
    """log det H from its Cholesky factor; NaN if H is not positive definite."""
    q = H.shape[0]
    L = np.zeros((q, q))
    total = 0.0
    for j in range(q):
        s = H[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not s > 0.0:
            return np.nan
        L[j, j] = math.sqrt(s)
        total += 2.0 * math.log(L[j, j])
        for i in range(j + 1, q):
            s = H[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / L[j, j]
    return total
