"""When and how a GLMM engine evaluates through the fused kernel (:mod:`fedglmm.likelihood.kernel`).

The Laplace value, gradient and Hessian of a site with at least :data:`MIN_ROWS` rows come from the
compiled kernel (one pass over the rows, no per-row temporaries); smaller parts, AGHQ, and families the
kernel does not know use the numpy engine of :mod:`fedglmm.likelihood.laplace`, so a small fit never
loads the compiler.  Both compute the same quantities; they agree to rounding (the tests check 1e-9).
numba is a dependency of the package; where it cannot be imported the numpy engine does everything.

A part with at least :data:`CHUNK_ROWS` rows splits its groups into chunks evaluated in parallel threads
(the kernel runs without the interpreter lock); the chunks' sums are added in a fixed order, so the
result does not depend on the number of threads.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .blas import single_blas

# parts with fewer rows stay on the numpy engine (FEDGLMM_FUSED_MIN_ROWS=0: every part on the kernel)
MIN_ROWS = int(os.environ.get("FEDGLMM_FUSED_MIN_ROWS", 5_000))
CHUNK_ROWS = 250_000             # parts with more rows are cut into chunks of about this many rows
# the coordinator's pseudo-data (nothing else runs beside them): cut into SPREAD chunks of equal rows, of
# SPREAD_ROWS at least, whatever the machine's cores, so that the sums do not depend on them
SPREAD = 8
SPREAD_ROWS = 2_000
# parts (or sites) answer one after the other unless they hold PARALLEL_ROWS rows in all and one of them
# SITE_ROWS at least: smaller ones' work is mostly the interpreter's, which threads cannot share, and handing
# the interpreter lock between threads costs more than they gain (the demo's 1934 rows over 4 sites fit in
# 0.33 s serially, 0.36-0.39 s in threads; benchmarks/bench_scale.py's 1e5 rows over 100 sites of 1000 rows,
# iterative: 1.9 s serially, 3.1 s in two threads; over 25 sites of 4000: 1.23 and 1.37 s; over 40 sites of
# 5000 rows: 1.02 and 0.75 s)
PARALLEL_ROWS = 10_000
SITE_ROWS = 5_000
_POOL: ThreadPoolExecutor | None = None
_PARTS: ThreadPoolExecutor | None = None
_KERNEL = None                   # the compiled module once imported; False if numba is missing
_LOAD = threading.Lock()
_LOCAL = threading.local()       # min_rows of this thread (see rows_from)


def min_rows() -> int:
    """The rows from which an engine evaluated in this thread uses the kernel: :data:`MIN_ROWS`, unless
    :func:`rows_from` says otherwise."""
    return getattr(_LOCAL, "min_rows", MIN_ROWS)


@contextmanager
def rows_from(rows: int):
    """Engines evaluated in this thread meanwhile use the kernel from ``rows`` rows.  In-process sites
    that hold :data:`MIN_ROWS` rows together share one process, and with it the kernel's load (about 0.5 s
    of CPU once): there it pays for a site of any size (1e5 rows over 100 sites of 1,000: the sites' CPU
    per round 0.80 -> 0.30 s), while a site of its own process with fewer rows fits faster without it."""
    before = getattr(_LOCAL, "min_rows", None)
    _LOCAL.min_rows = rows
    try:
        yield
    finally:
        if before is None:
            del _LOCAL.min_rows
        else:
            _LOCAL.min_rows = before


def _kernel():
    global _KERNEL
    with _LOAD:
        if _KERNEL is None:
            try:
                _drop_stale_cache()
                from . import kernel, rows
                _KERNEL = (kernel, rows)
            except ImportError:
                _KERNEL = False
    return _KERNEL


def prefetch(design, family, nagq: int) -> None:
    """At set-up, if the site's engine will evaluate through the kernel, load it in a background thread:
    importing numba and loading the cached machine code take about 0.5 s of CPU once per process, which
    then overlaps the rest of the set-up (and, over a network, the wait for the first evaluation)
    instead of delaying the first evaluation.  Nothing once it is loaded (by a site's own fit, say)."""
    q = design.Z.shape[1]
    if _KERNEL is not None or nagq != 1 or q == 0 or design.factors or len(design.y) < min_rows() \
            or getattr(family, "ndisp", 0):
        return
    k = int(np.sum(design.theta_mask))
    threading.Thread(target=_warm, args=(family.name, family.link, design.X.shape[1], q, k), daemon=True,
                     name="fedglmm-kernel-load").start()


def _warm(name: str, link: str, p: int, q: int, k: int) -> None:
    """One call of the kernel on no groups, with arguments of the types :class:`FusedLaplace` passes."""
    kern = _kernel()
    if not kern or (name, link) not in kern[1].CODES:
        return
    f, i, P = np.zeros, np.int64, p + k
    try:
        kern[0].laplace_chunk(kern[1].CODES[(name, link)], False, f((1, p)), f((1, q)), f(1), f(1), f(1),
                              f(1, i), f(1, i), f(p), f((q, q)), f(k, i), f(k, i), 2, f((1, q)), 0, 0, True,
                              f((1, q, P)), f((1, q, q)), f(P), f((P, P)), f((P, P)))
    except Exception:                  # a warm-up only: the first evaluation loads (and reports) anyway
        pass


_SOURCES = ("kernel.py", "kernel_terms.py", "rows.py")     # the kernel's sources (rows.py compiled into both)


def _drop_stale_cache(here=None) -> None:
    """numba keys a cached function to its own file's time stamp only, not to the files whose functions it
    compiles in: after rows.py (or kernel_terms.py) changes, a checkout or an edit, the old machine code of
    kernel.py (or kernel_terms.py) would still be loaded.  So their compiled files beside the source
    (``__pycache__/kernel.*``, ``kernel_terms.*``) are dropped when the sources' hash differs from the one
    recorded with them."""
    import hashlib
    from pathlib import Path

    here = Path(here or Path(__file__).parent)
    cache = here / "__pycache__"
    digest = hashlib.sha256(b"".join((here / f).read_bytes() for f in _SOURCES)).hexdigest()
    stamp = cache / "kernel.sources"
    try:
        if stamp.exists() and stamp.read_text() == digest:
            return
        for f in [*cache.glob("kernel.*.nb[ic]"), *cache.glob("kernel_terms.*.nb[ic]")]:
            f.unlink()
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:                  # a read-only install: numba caches elsewhere, stamped by the install
        pass


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="fedglmm-chunk")
    return _POOL


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parallel_map(fn, items: list, parallel: bool = True) -> list:
    """``[fn(x) for x in items]`` with the items in parallel threads (the coordinator's parts: the pseudo-data
    stand-ins of the sites), results in order; one after the other unless ``parallel`` (see :func:`threads_pay`)."""
    global _PARTS
    if len(items) < 2 or _cores() < 2 or not parallel:
        return [fn(x) for x in items]
    if _PARTS is None:
        _PARTS = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="fedglmm-part")
    with single_blas():                  # one BLAS thread in each part's thread
        return list(_PARTS.map(fn, items))


def threads_pay(holders) -> bool:
    """Whether engines (or sites) are worth evaluating in parallel threads: they hold :data:`PARALLEL_ROWS`
    rows in all and one of them :data:`SITE_ROWS` at least (their ``n``; a site: its frame's length), or one
    does not say how many."""
    sizes = []
    for h in holders:
        frame = getattr(h, "frame", None)
        n = len(frame) if frame is not None else getattr(h, "n", None)
        if n is None:
            return True
        sizes.append(int(n))
    return sum(sizes) >= PARALLEL_ROWS and max(sizes, default=0) >= SITE_ROWS


def usable(lik) -> bool:
    """Whether the fused kernel evaluates this engine (Laplace, random effects, a family it knows, enough
    rows, numba importable)."""
    if lik.q == 0 or len(lik.ck) != 1 or (lik.n < min_rows() and not getattr(lik, "kernel", False)):
        return False
    if getattr(lik.family, "ndisp", 0):
        return False
    kern = _kernel()
    return bool(kern) and (lik.family.name, lik.family.link) in kern[1].CODES


class FusedLaplace:
    """The kernel's view of one engine's arrays (contiguous float64, group boundaries, Λ's pattern)."""

    def __init__(self, lik):
        kernel, rows = _kernel()
        self.kernel = kernel
        self.code = rows.CODES[(lik.family.name, lik.family.link)]
        self.expected = lik.curvature == "expected"
        # contiguous, writable arrays: the types the kernel was compiled (and is warmed, prefetch) for
        self.X, self.Z, self.y, self.m, self.off = (np.require(a, float, ["C", "W"])
                                                    for a in (lik.X, lik.Z, lik.y, lik.m, lik.off))
        self.starts = np.require(lik.starts, np.int64, ["C", "W"])
        self.ends = np.append(self.starts[1:], lik.n).astype(np.int64)
        self.tr, self.tc = (np.require(a, np.int64, ["C", "W"]) for a in (lik.theta_r, lik.theta_c))
        self.p, self.q, self.G = lik.p, lik.q, lik.G
        spread = min(SPREAD, lik.n // SPREAD_ROWS) if getattr(lik, "spread", False) else 1
        size = min(CHUNK_ROWS, -(-lik.n // spread)) if spread > 1 else CHUNK_ROWS
        cuts = np.searchsorted(self.starts, np.arange(size, lik.n, size))
        self.chunks = [(int(a), int(b)) for a, b in zip(np.r_[0, cuts], np.r_[cuts, self.G]) if b > a]

    def run(self, beta, lam, u, level: int, keep_du: bool = False):
        """(value, grad, hess, ok) without the family's constant; ``u`` (G × q) is the start and receives
        the modes; with ``keep_du`` also each group's dU (G × q × P) and H⁻¹ (G × q × q)."""
        P = self.p + len(self.tr)
        du = np.empty((self.G if keep_du else 0, self.q, P))
        hinv = np.empty((self.G if keep_du else 0, self.q, self.q))
        acc = [(np.zeros(P), np.zeros((P, P)), np.zeros((P, P))) for _ in self.chunks]

        def one(i):
            g0, g1 = self.chunks[i]
            grad, R, G = acc[i]
            return self.kernel.laplace_chunk(self.code, self.expected, self.X, self.Z, self.y, self.m, self.off,
                                             self.starts, self.ends, beta, lam, self.tr, self.tc, level, u,
                                             g0, g1, keep_du, du, hinv, grad, R, G)

        if len(self.chunks) > 1:
            out = list(_pool().map(one, range(len(self.chunks))))
        else:
            out = [one(i) for i in range(len(self.chunks))]
        ok = all(o[1] for o in out)
        value = 0.0
        grad, R, G = np.zeros(P), np.zeros((P, P)), np.zeros((P, P))
        for (v, _), (g, r, gg) in zip(out, acc):
            value += v
            grad += g
            R += r
            G += gg
        hs = np.triu(R) + np.triu(R, 1).T + G
        return value, grad, 0.5 * (hs + hs.T), ok, du, hinv


def evaluate(lik, phi: np.ndarray, hess: bool):
    """(value, gradient, Hessian or None) of a :class:`~fedglmm.likelihood.laplace.GLMMLikelihood` from the
    kernel, from the modes in ``lik.u`` (which receives the new ones, with dû/dφ and H⁻¹ kept for the next
    start and for the conditional modes); a failure (a singular curvature) raises, as the numpy engine does."""
    lik._fused = lik._fused or FusedLaplace(lik)
    u = np.array(lik.u, copy=True)
    value, gr, H, ok, dU, Hinv = lik._fused.run(phi[: lik.p], lik.lam(phi[lik.p:lik.p + lik.ntheta]), u,
                                                2 if hess else 1, keep_du=True)
    if not ok:
        raise np.linalg.LinAlgError("a group's curvature is singular")
    lik.u, lik._last, lik._hinv = u, (phi.copy(), dU), Hinv
    return value + lik.const, gr, (H if hess else None)


def modes(lik, phi: np.ndarray, lam: np.ndarray):
    """(û, H⁻¹ per group) at φ: those of the last evaluation if it was at φ (the final round), else from the
    kernel; None if the kernel fails there."""
    if lik._last is not None and np.array_equal(lik._last[0], phi):
        return lik.u, lik._hinv
    lik._fused = lik._fused or FusedLaplace(lik)
    u = np.array(lik.u, copy=True)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        *_, ok, _, Hinv = lik._fused.run(phi[: lik.p], lam, u, 0, keep_du=True)
    return (u, Hinv) if ok else None
