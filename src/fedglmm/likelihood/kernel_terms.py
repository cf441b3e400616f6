"""The fused Laplace kernel's per-group derivative terms (:mod:`fedglmm.likelihood.kernel`): the modes'
derivative dû/dφ, the gradient's trace terms and the Hessian's, from a group's sums at its mode.

See :mod:`fedglmm.likelihood.kernel` for the accumulators (``grad``, ``R`` upper triangle, ``G``) and
:meth:`~fedglmm.likelihood.laplace.GLMMLikelihood._laplace_hessian` for the pieces they add up to.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .rows import mm, solve


@njit(cache=True)
def derivatives(X, Z, s, n, u, D, tr, tc, Sg, level, grad, R, G, dU, Hinv, W, lam):
    """The group's mode derivatives dU (q × P), the gradient and (level 2) Hessian contributions.
    W = (lev (n), dH (P × q × q), T (L × P), Q (q(q+1)/2 × L), S (L × L), the rows' w (n × L), sw·w
    (n × L)) is scratch, L = p + q.
    Each row's η̇ = E + dUᵀm is Tᵀw for its covariates w = (x, z), with T the same for the group's rows
    (T = [I 0] over x; ΛdU, and u in θ's columns, over z): so every sum over the rows of a coefficient
    times η̇ is that sum times w, times T.  The coefficients w'·m_a m_b and 2w'(H⁻¹m)_c z_r are Λ- and
    H⁻¹Λᵀ-combinations of w'·z_c z_d, so the rows add Q = Σ w' z_c z_d wᵀ alone (q(q+1)/2 × L); Σ d2 z wᵀ
    is the sums at the mode's (Σ d2 z xᵀ, Σ d2 z zᵀ)."""
    H, hobs, cb, ztd1, md2z, N, Wzz, Sd, czx = Sg
    lev, dH, T, Q, _, Wm, _ = W
    p, q, k = X.shape[1], Z.shape[1], len(tr)
    P, L = p + k, p + q
    C = np.empty((q, P))
    C[:, :p] = cb
    for t in range(k):
        for a in range(q):
            C[a, p + t] = md2z[a, tr[t]] * u[tc[t]]
        C[tc[t], p + t] += ztd1[tr[t]]
    if not solve(hobs, C, dU) or not solve(H, np.eye(q), Hinv):
        return False
    for t in range(k):
        grad[p + t] += ztd1[tr[t]] * u[tc[t]]
    T[:, :] = 0.0
    for a in range(p):
        T[a, a] = 1.0
    mm(lam, dU, T[p:])
    for t in range(k):
        T[p + tr[t], p + t] += u[tc[t]]
    K, Pm = np.empty((q, q)), np.empty((q, q))          # K = Λ H⁻¹ Λᵀ (lev = zᵀKz), Pm = H⁻¹Λᵀ
    mm(Hinv, lam.T, Pm)
    mm(lam, Pm, K)
    zl = np.zeros(q)                                     # Σ z w' lev
    nq = q * (q + 1) // 2
    coef = np.empty((nq, n))
    for j in range(n):
        r = s + j
        w1 = D[j, 4]
        for l in range(p):
            Wm[j, l] = X[r, l]
        for l in range(q):
            Wm[j, p + l] = Z[r, l]
        lv = 0.0
        for a in range(q):
            acc = 0.0
            for b in range(q):
                acc += K[a, b] * Z[r, b]
            lv += Z[r, a] * acc
        lev[j] = lv
        i = 0
        for a in range(q):
            f0 = w1 * Z[r, a]
            zl[a] += f0 * lv
            for b in range(a, q):
                coef[i, j] = f0 * Z[r, b]
                i += 1
    Q[:, :] = np.dot(coef, Wm[:n])
    return _from_sums(p, q, k, P, L, tr, tc, level, grad, G, dU, Hinv, N, Sd, czx, T, Q, dH, lam, Pm, zl, X, Z,
                      s, n, D, hobs, Wzz, C, W, R)


@njit(cache=True)
def _pair(a, b, q):
    """The index of (min(a, b), max(a, b)) among the pairs a ≤ b in row order."""
    if a > b:
        a, b = b, a
    return a * q - a * (a - 1) // 2 + (b - a)


@njit(cache=True)
def _from_sums(p, q, k, P, L, tr, tc, level, grad, G, dU, Hinv, N, Sd, czx, T, Q, dH, lam, Pm, zl, X, Z, s, n, D,
               hobs, Wzz, C, W, R):
    """dH, the gradient's trace terms and (level 2) the Hessian, from the group's sums Q and T."""
    vec, out = np.empty((1, L)), np.empty((1, P))       # a combination of Q's rows, and it times T
    for a in range(q):                                   # dH = Σ w' m_a m_b η̇ᵀ, m = Λᵀz
        for b in range(a, q):
            vec[:, :] = 0.0
            for c in range(q):
                for d in range(q):
                    f = lam[c, a] * lam[d, b]
                    if f != 0.0:
                        i = _pair(c, d, q)
                        for l in range(L):
                            vec[0, l] += f * Q[i, l]
            mm(vec, T, out)
            for t in range(P):
                dH[t, a, b] = out[0, t]
                dH[t, b, a] = out[0, t]
    for t in range(k):
        for b in range(q):
            dH[p + t, tc[t], b] += N[tr[t], b]
            dH[p + t, b, tc[t]] += N[tr[t], b]
    for t in range(P):
        acc = 0.0
        for a in range(q):
            for b in range(q):
                acc += Hinv[a, b] * dH[t, a, b]
        grad[t] += -0.5 * acc
    if level < 2:
        return True
    F, CS = np.empty((q, P)), np.empty((q, L))         # Σ d2 z η̇ᵀ = (Σ d2 z xᵀ, Σ d2 z zᵀ) T
    CS[:, :p] = czx
    CS[:, p:] = Sd
    mm(CS, T, F)
    for t in range(k):                                   # −Σ 2w'(H⁻¹m)_c z_r η̇ᵀ
        vec[:, :] = 0.0
        for c in range(q):
            f, i = 2.0 * Pm[tc[t], c], _pair(tr[t], c, q)
            for l in range(L):
                vec[0, l] += f * Q[i, l]
        mm(vec, T, out)
        for t2 in range(P):
            G[p + t, t2] -= out[0, t2]
    a_g = np.zeros((q, 1))
    for a in range(q):
        for c in range(q):
            a_g[a, 0] += lam[c, a] * zl[c]
    bg = zl.copy()
    return _hessian_group(Z, X, s, n, D, tr, tc, p, C, dU, Hinv, hobs, Wzz, a_g, bg, F, W, R, G, lam, T)


@njit(cache=True)
def _hessian_group(Z, X, s, n, D, tr, tc, p, C, dU, Hinv, hobs, Wzz, a_g, bg, F, W, R, G, lam, T):
    """The rest of the group's Hessian terms, once v = H_obs⁻¹ a_g is known (a second sweep over the
    group's rows, which are still in cache).  Σ d2 E Eᵀ (E = ∂η/∂φ at fixed u) rides on the sweep's
    rank-one update through E = η̇ − dUᵀm: Σ sw η̇ η̇ᵀ = Tᵀ (Σ sw w wᵀ) T, − Bᵀ dU − dUᵀ B + dUᵀ A dU,
    with B = Σ d2 m η̇ᵀ = ΛᵀF and A = Σ d2 m mᵀ = I − H_obs."""
    lev, dH, _, _, S, Wm, Ws = W
    q, k = Z.shape[1], len(tr)
    P, L = p + k, p + q
    v = np.empty((q, 1))
    if not solve(hobs, a_g, v):
        return False
    lv_ = np.zeros(q)                                    # Λv: v·m = z·Λv
    for c in range(q):
        for a in range(q):
            lv_[c] += lam[c, a] * v[a, 0]
    for j in range(n):
        r = s + j
        d2, d3, w2 = D[j, 1], D[j, 2], D[j, 5]
        vm = 0.0
        for c in range(q):
            vm += Z[r, c] * lv_[c]
        sw = d2 - 0.5 * (w2 * lev[j] + d3 * vm)
        for a in range(q):
            bg[a] += Z[r, a] * (d2 * vm)
        for l in range(L):
            Ws[j, l] = sw * Wm[j, l]
    S[:, :] = np.dot(Ws[:n].T, Wm[:n])                 # Σ sw w wᵀ
    ST, TST = np.empty((L, P)), np.empty((P, P))        # Σ sw η̇ η̇ᵀ = Tᵀ S T (whole: its upper triangle is used)
    mm(S, T, ST)
    mm(T.T, ST, TST)
    R += TST
    B, A, AdU = np.empty((q, P)), np.empty((q, q)), np.empty((q, P))
    mm(lam.T, F, B)                                      # B = ΛᵀF, A dU with A = I − H_obs
    for c in range(q):
        for a in range(q):
            A[c, a] = (1.0 if a == c else 0.0) - hobs[c, a]
    mm(A, dU, AdU)
    for s1 in range(P):                               # Cᵀ dU, and E's corrections
        for s2 in range(P):
            acc = 0.0
            for a in range(q):
                acc += C[a, s1] * dU[a, s2] - 2.0 * B[a, s1] * dU[a, s2] + dU[a, s1] * AdU[a, s2]
            G[s1, s2] += acc
    for t in range(k):                                # −K: the q-terms, the F term, 2 Wzz ∘ H⁻¹
        for s1 in range(P):
            G[s1, p + t] -= bg[tr[t]] * dU[tc[t], s1]
            G[p + t, s1] -= v[tc[t], 0] * F[tr[t], s1]
        for t2 in range(k):
            G[p + t, p + t2] -= Wzz[tr[t], tr[t2]] * Hinv[tc[t], tc[t2]]
    HdH = np.empty((P, q, q))
    for t in range(P):
        for a in range(q):
            for b in range(q):
                acc = 0.0
                for c in range(q):
                    acc += Hinv[a, c] * dH[t, c, b]
                HdH[t, a, b] = acc
    for s1 in range(P):
        for s2 in range(P):
            acc = 0.0
            for a in range(q):
                for b in range(q):
                    acc += HdH[s1, a, b] * HdH[s2, b, a]
            G[s1, s2] += 0.5 * acc
    return True
