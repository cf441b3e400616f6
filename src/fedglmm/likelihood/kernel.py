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

from .kernel_terms import derivatives
from .mode_start import MODE_ITERATIONS
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
def _sweep(code, y, m, s, n, eta, M, u, grad, hobs):
    """∇h (q × 1) and the Newton matrix −∇²h at η."""
    q = M.shape[1]
    grad[:, 0] = 0.0
    hobs[:, :] = 0.0
    for j in range(n):
        d1, d2 = d12_row(code, y[s + j], m[s + j], eta[j])
        for a in range(q):
            grad[a, 0] += M[j, a] * d1
            for b in range(q):
                hobs[a, b] += -d2 * M[j, a] * M[j, b]
    for a in range(q):
        grad[a, 0] -= u[a]
        hobs[a, a] += 1.0


@njit(cache=True)
def _mode(code, y, m, s, n, eta0, M, u, eta, eta_new, fuse):
    """Newton with step halving for the group's mode û = argmax h (``u`` in, û out; η at û in ``eta``);
    returns 0 (a singular Newton matrix, or no mode within MODE_ITERATIONS steps), 1 (converged) or, with
    ``fuse``, 2 after a full step shorter than :data:`FUSE_STEP`: the caller's pass for the sums at the mode
    then gives the next step too.
    The numpy engine's iteration, for one group: a step of Newton decrement 1e-8 or more must not lower h,
    else it is halved.  The full step is tried first and the pass for the derivatives at its end tests
    it: h is concave in u (so is every kernel family's log-density in η), so where h's slope along the
    step is not negative at its end, h rose all along it and h is not computed (nearly always); else h at
    both ends decides.  The points visited are those of a separate test pass."""
    q = M.shape[1]
    grad, hobs, step = np.empty((q, 1)), np.empty((q, q)), np.empty((q, 1))
    u_new = np.empty(q)
    _eta(eta0, M, u, n, eta)
    h, known, trial = 0.0, False, False
    it = 0
    while it < MODE_ITERATIONS or trial:
        if trial:                                  # the derivatives at the full step's end
            trial = False
            for c in range(q):
                u_new[c] = u[c] + step[c, 0]
            _sweep(code, y, m, s, n, eta_new, M, u_new, grad, hobs)
            if np.sum(grad[:, 0] * step[:, 0]) >= 0.0:     # h's slope at the end: h rose all along
                known = False
            else:                                  # h may have fallen: compare it at both ends
                if not known:
                    h = _h(code, y, m, s, n, eta, u)
                h_new = _h(code, y, m, s, n, eta_new, u_new)
                if h_new < h - 1e-12 * (1.0 + abs(h)):     # h fell: halve, as the step test does
                    known = False
                    if _halve(code, y, m, s, n, eta0, M, u, eta, eta_new, step, u_new, h):
                        return 1
                    continue
                h, known = h_new, True
            u[:] = u_new
            eta[:n] = eta_new[:n]
            if np.max(np.abs(step[:, 0])) < 1e-10:
                return 1
            if it >= MODE_ITERATIONS:
                return 0
        else:
            _sweep(code, y, m, s, n, eta, M, u, grad, hobs)
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
        for c in range(q):
            u_new[c] = u[c] + step[c, 0]
        _eta(eta0, M, u_new, n, eta_new)
        trial = True
    return 0


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
    W = (np.empty(nmax), np.empty((P, q, q)), np.empty((p + q, P)), np.empty((q * (q + 1) // 2, p + q)),
         np.empty((p + q, p + q)), np.empty((nmax, p + q)), np.empty((nmax, p + q)))
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
            if not derivatives(X, Z, s, n, ug, D, tr, tc, Sg, level, grad, R, G, dU, Hinv, W, lam):
                return value, False
            if keep_du:
                du_out[g] = dU
                hinv_out[g] = Hinv
    return value, True
