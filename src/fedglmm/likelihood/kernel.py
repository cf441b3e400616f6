"""The fused Laplace kernel: one site's value, gradient and Hessian in one pass over its rows.

The arithmetic is that of :class:`~fedglmm.likelihood.laplace.GLMMLikelihood` (see its module docstring
for the model and the pieces of the gradient and Hessian), reorganised by group: the rows of a group are
contiguous, so the kernel takes one group at a time, finds its mode by Newton's method on rows that stay
in the processor's cache, and adds the group's contributions to the sums.  Memory traffic is one read of
the rows per evaluation; nothing of size n × P × q × q (nor n × P) is ever formed.  Compiled by numba,
without the interpreter lock, so sites (and chunks of groups) run in parallel threads.

Accumulators of a chunk of groups: ``value``; ``grad`` (P); ``R`` (P × P, upper triangle): the row-wise
rank-one terms Σ d2 E Eᵀ − ½ Σ (w2·lev + d3·vm) η̇ η̇ᵀ; ``G`` (P × P): the group-wise terms Cᵀ dU,
½ tr(H⁻¹Ḣ_s H⁻¹Ḣ_t) and −K for the non-symmetric pieces K of :meth:`GLMMLikelihood._laplace_hessian`.  The
Hessian is ½(hs + hsᵀ) with hs = R (mirrored) + G.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .rows import at_mode, chol_logdet, d12_row, loglik_row, solve


# a mode's Newton step shorter than this is taken without a look, and the sums come at its end (the next
# step is then ~1e-11; after steps of decrement 1e-8 it was often above 1e-12, and the sums were made twice)
FUSE_STEP = 3e-6


@njit(cache=True)
def _eta(eta0, M, u, n, eta):
    q = M.shape[1]
    for j in range(n):
        acc = 0.0
        for c in range(q):
            acc += M[j, c] * u[c]
        eta[j] = eta0[j] + acc


@njit(cache=True)
def _h(code, y, m, s, n, eta, u):
    total = 0.0
    for j in range(n):
        total += loglik_row(code, y[s + j], m[s + j], eta[j])
    return total - 0.5 * np.sum(u * u)


@njit(cache=True)
def _sweep(code, y, m, s, n, eta, M, u, grad, hobs, with_h):
    """∇h (q × 1) and the Newton matrix −∇²h at η; with ``with_h`` also h itself (else 0), summed in the
    order :func:`_h` sums it."""
    q = M.shape[1]
    grad[:, 0] = 0.0
    hobs[:, :] = 0.0
    total = 0.0
    for j in range(n):
        d1, d2 = d12_row(code, y[s + j], m[s + j], eta[j])
        if with_h:
            total += loglik_row(code, y[s + j], m[s + j], eta[j])
        for a in range(q):
            grad[a, 0] += M[j, a] * d1
            for b in range(q):
                hobs[a, b] += -d2 * M[j, a] * M[j, b]
    for a in range(q):
        grad[a, 0] -= u[a]
        hobs[a, a] += 1.0
    return total - 0.5 * np.sum(u * u) if with_h else 0.0


@njit(cache=True)
def _mode(code, y, m, s, n, eta0, M, u, eta, eta_new, fuse):
    """Newton with step halving for the group's mode û = argmax h (``u`` in, û out; η at û in ``eta``);
    returns 0 (a singular Newton matrix), 1 (converged) or, with ``fuse``, 2 after a full step shorter
    than :data:`FUSE_STEP`: the caller's pass for the sums at the mode then gives the next step too.
    The numpy engine's iteration, for one group: a step of Newton decrement 1e-8 or more must not lower h,
    else it is halved.  The full step is tried first and the pass for the derivatives at its end tests
    it: h is concave in u (so is every kernel family's log-density in η), so where h's slope along the
    step is not negative at its end, h rose all along it and h is not computed (nearly always); else h at
    both ends decides.  The points visited are those of a separate test pass."""
    q = M.shape[1]
    grad, hobs, step = np.empty((q, 1)), np.empty((q, q)), np.empty((q, 1))
    u_new = np.empty(q)
    _eta(eta0, M, u, n, eta)
    h, known, known_start, trial = 0.0, False, False, False
    it = 0
    while it < 100 or trial:
        if trial:                                  # the derivatives at the full step's end
            trial = False
            for c in range(q):
                u_new[c] = u[c] + step[c, 0]
            _sweep(code, y, m, s, n, eta_new, M, u_new, grad, hobs, False)
            slope = np.sum(grad[:, 0] * step[:, 0])
            known = False
            if not slope >= 0.0:                   # h may have fallen: compare it at both ends
                if not known_start:
                    h = _h(code, y, m, s, n, eta, u)
                h_new = _h(code, y, m, s, n, eta_new, u_new)
                if h_new < h - 1e-12 * (1.0 + abs(h)):     # h fell: halve, as the step test does
                    if _halve(code, y, m, s, n, eta0, M, u, eta, eta_new, step, u_new, h):
                        return 1
                    continue
                h, known = h_new, True
            u[:] = u_new
            eta[:n] = eta_new[:n]
            if np.max(np.abs(step[:, 0])) < 1e-10 or it >= 100:
                return 1
        else:
            _sweep(code, y, m, s, n, eta, M, u, grad, hobs, False)
        it += 1
        if not solve(hobs, grad, step):
            return 0
        dec = np.sum(grad[:, 0] * step[:, 0])
        if dec < 1e-8:
            u += step[:, 0]
            _eta(eta0, M, u, n, eta)
            if np.max(np.abs(step[:, 0])) < 1e-10:
                return 1
            if fuse and np.max(np.abs(step[:, 0])) < FUSE_STEP:
                return 2
            known = False
            continue
        known_start = known
        for c in range(q):
            u_new[c] = u[c] + step[c, 0]
        _eta(eta0, M, u_new, n, eta_new)
        trial = True
    return 1


@njit(cache=True)
def _halve(code, y, m, s, n, eta0, M, u, eta, eta_new, step, u_new, h):
    """The step test after its full step failed: the step halved until h does not fall (at most 40 tries
    in all); u and η move to the point taken.  True if that move is below 1e-10 (the mode is found)."""
    q = M.shape[1]
    t, t_used = 0.5, 0.5
    for _ in range(39):
        for c in range(q):
            u_new[c] = u[c] + t * step[c, 0]
        _eta(eta0, M, u_new, n, eta_new)
        h_new = _h(code, y, m, s, n, eta_new, u_new)
        t_used = t
        if not h_new < h - 1e-12 * (1.0 + abs(h)):
            break
        t *= 0.5
    u[:] = u_new
    eta[:n] = eta_new[:n]
    return np.max(np.abs(t_used * step[:, 0])) < 1e-10


@njit(cache=True)
def _rows_of(X, Z, off, beta, lam, s, n, eta0, M):
    """η at u = 0 and M = ZΛ for the group's rows."""
    p, q = X.shape[1], Z.shape[1]
    for j in range(n):
        acc = off[s + j]
        for k in range(p):
            acc += X[s + j, k] * beta[k]
        eta0[j] = acc
        for c in range(q):
            v = 0.0
            for a in range(q):
                v += Z[s + j, a] * lam[a, c]
            M[j, c] = v


@njit(cache=True)
def _derivatives(X, Z, s, n, u, M, D, tr, tc, Sg, level, grad, R, G, dU, Hinv, W, lam):
    """The group's mode derivatives dU (q × P), the gradient and (level 2) Hessian contributions.
    W = (deta (n × P), lev (n), HinvM (n × q), dH (P × q × q), sw·deta (n × P)) is scratch.  The sums
    over the group's rows of a coefficient times η̇ (Σ w' m mᵀ η̇ᵀ, Σ d2 z η̇ᵀ, Σ 2w' (H⁻¹m)_c z_r η̇ᵀ) are
    one small matrix product of the rows' coefficients with η̇, as is η̇ = E + M dU itself."""
    H, hobs, cb, ztd1, md2z, N, Wzz, _, _ = Sg
    deta, lev, HinvM, dH, _ = W
    p, q, k = X.shape[1], M.shape[1], len(tr)
    P = p + k
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
    a_g, bg = np.zeros((q, 1)), np.zeros(q)
    F = np.zeros((q, P))
    nq = q * (q + 1) // 2
    coef = np.empty((nq + q + k if level >= 2 else nq, n))
    for j in range(n):
        r = s + j
        for kk in range(p):
            deta[j, kk] = X[r, kk]
        for t in range(k):
            deta[j, p + t] = Z[r, tr[t]] * u[tc[t]]
    deta_n = deta[:n]
    deta_n += np.dot(M[:n], dU)
    for j in range(n):
        r = s + j
        w1, d2 = D[j, 4], D[j, 1]
        lv = 0.0
        for a in range(q):
            hm = 0.0
            for b in range(q):
                hm += Hinv[a, b] * M[j, b]
            HinvM[j, a] = hm
            lv += M[j, a] * hm
        lev[j] = lv
        i = 0
        for a in range(q):                  # Σ w' η̇ m mᵀ: the upper triangle (mirrored below)
            for b in range(a, q):
                coef[i, j] = w1 * M[j, a] * M[j, b]
                i += 1
        if level >= 2:
            for a in range(q):
                a_g[a, 0] += M[j, a] * (w1 * lv)
                bg[a] += Z[r, a] * (w1 * lv)
                coef[nq + a, j] = Z[r, a] * d2
            for t in range(k):
                coef[nq + q + t, j] = 2.0 * w1 * HinvM[j, tc[t]] * Z[r, tr[t]]
    out = np.dot(coef, deta_n)
    i = 0
    for a in range(q):
        for b in range(a, q):
            for t in range(P):
                dH[t, a, b] = out[i, t]
                dH[t, b, a] = out[i, t]
            i += 1
    if level >= 2:
        F[:, :] = out[nq:nq + q]
        G[p:, :] -= out[nq + q:]
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
    if level >= 2:
        return _hessian_group(Z, s, n, M, D, tr, tc, p, C, dU, Hinv, hobs, Wzz, a_g, bg, F, W, R, G, lam)
    return True


@njit(cache=True)
def _hessian_group(Z, s, n, M, D, tr, tc, p, C, dU, Hinv, hobs, Wzz, a_g, bg, F, W, R, G, lam):
    """The rest of the group's Hessian terms, once v = H_obs⁻¹ a_g is known (a second sweep over the
    group's rows, which are still in cache).  Σ d2 E Eᵀ (E = ∂η/∂φ at fixed u) rides on the sweep's
    rank-one update through E = η̇ − dUᵀm: Σ d2 η̇ η̇ᵀ − Bᵀ dU − dUᵀ B + dUᵀ A dU, with B = Σ d2 m η̇ᵀ = ΛᵀF
    and A = Σ d2 m mᵀ = I − H_obs."""
    deta, lev, HinvM, dH, swd = W
    q, k = M.shape[1], len(tr)
    P = p + k
    v = np.empty((q, 1))
    if not solve(hobs, a_g, v):
        return False
    for j in range(n):
        d2, d3, w2 = D[j, 1], D[j, 2], D[j, 5]
        vm = 0.0
        for c in range(q):
            vm += M[j, c] * v[c, 0]
        sw = d2 - 0.5 * (w2 * lev[j] + d3 * vm)
        for a in range(q):
            bg[a] += Z[s + j, a] * (d2 * vm)
        for a in range(P):
            swd[j, a] = sw * deta[j, a]
    R += np.dot(swd[:n].T, deta[:n])                # Σ sw η̇ η̇ᵀ (whole: its upper triangle is used)
    B, AdU = np.zeros((q, P)), np.zeros((q, P))
    for c in range(q):
        for t in range(P):
            acc = 0.0
            for a in range(q):
                acc += lam[a, c] * F[a, t]
            B[c, t] = acc
            acc = 0.0
            for a in range(q):
                acc += ((1.0 if a == c else 0.0) - hobs[c, a]) * dU[a, t]
            AdU[c, t] = acc
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


@njit(cache=True, nogil=True)
def laplace_chunk(code, expected, X, Z, y, m, off, starts, ends, beta, lam, tr, tc, level, u, g0, g1,
                  keep_du, du_out, hinv_out, grad, R, G):
    """Groups g0 .. g1 − 1: their modes (``u`` is the start and receives û), and the sums at ``level``
    (0 value, 1 gradient, 2 Hessian) added to ``grad``, ``R`` and ``G``; with ``keep_du`` each group's dU
    goes to ``du_out`` and its H⁻¹ to ``hinv_out``.  Returns (value, ok)."""
    p, q, k = X.shape[1], Z.shape[1], len(tr)
    P = p + k
    nmax = 1
    for g in range(g0, g1):
        nmax = max(nmax, ends[g] - starts[g])
    eta0, eta, eta_new = np.empty(nmax), np.empty(nmax), np.empty(nmax)
    M, D = np.empty((nmax, q)), np.empty((nmax, 6))
    Sg = (np.empty((q, q)), np.empty((q, q)), np.empty((q, p)), np.empty(q), np.empty((q, q)),
          np.empty((q, q)), np.empty((q, q)), np.empty((q, q)), np.empty((q, p)))
    W = (np.empty((nmax, P)), np.empty(nmax), np.empty((nmax, q)), np.empty((P, q, q)), np.empty((nmax, P)))
    dU, Hinv = np.empty((q, P)), np.empty((q, q))
    gx, gu, stp = np.empty(p), np.empty((q, 1)), np.empty((q, 1))
    value = 0.0
    for g in range(g0, g1):
        s, n = starts[g], ends[g] - starts[g]
        _rows_of(X, Z, off, beta, lam, s, n, eta0, M)
        ug = u[g]
        state = _mode(code, y, m, s, n, eta0, M, ug, eta, eta_new, True)
        if state == 0:
            return value, False
        total = at_mode(code, expected, X, Z, y, m, s, n, ug, eta, lam, D, gx, gu, Sg)
        if state == 2:
            # the last Newton step was taken without a look: the sums there give the next step; below 1e-12
            # they are the sums at the mode, below 1e-10 (where Newton stops) the step is taken and the sums
            # made at its end, else Newton goes on
            if not solve(Sg[1], gu, stp):
                return value, False
            big = np.max(np.abs(stp[:, 0]))
            if big >= 1e-12:
                if big < 1e-10:
                    ug += stp[:, 0]
                    _eta(eta0, M, ug, n, eta)
                elif _mode(code, y, m, s, n, eta0, M, ug, eta, eta_new, False) == 0:
                    return value, False
                total = at_mode(code, expected, X, Z, y, m, s, n, ug, eta, lam, D, gx, gu, Sg)
        if level >= 1:
            grad[:p] += gx
        logdet = chol_logdet(Sg[0])
        value += total - 0.5 * np.sum(ug * ug) - 0.5 * logdet
        if level >= 1 or keep_du:
            if not _derivatives(X, Z, s, n, ug, M, D, tr, tc, Sg, level, grad, R, G, dU, Hinv, W, lam):
                return value, False
            if keep_du:
                du_out[g] = dU
                hinv_out[g] = Hinv
    return value, True
