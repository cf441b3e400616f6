"""One BLAS thread while a fit runs.

fedglmm's parallelism is its own: in-process sites answer a round in parallel threads
(:mod:`fedglmm.transport.inprocess`), the coordinator evaluates its pseudo-data parts the same way
(:func:`fedglmm.likelihood.fused.parallel_map`), and the compiled kernel splits large sites into chunks.
A multi-threaded BLAS (OpenBLAS starts one thread per core) inside that asks for threads × cores
workers, and its threads wait for each other by spinning: on this 2-core machine, with other work
running, a 400 × 400 Cholesky factorisation took 59 ms with OpenBLAS's 2 threads against 1.1 ms with
one, and a fit with levels shared by sites (dense dim(v)-wide blocks) 5.4 s against 1.2 s
(``benchmarks/README.md``).  The matrices of a fit are small (p, q, dim(v) wide), so one thread loses
little where the machine is idle.  :func:`single_blas` holds every BLAS library loaded in the process
at one thread for the duration of a block (a fit, a site's answer, a parallel round) and gives back the
caller's setting afterwards; nested and concurrent uses restore it only when the last one ends.
threadpoolctl (BSD-3-Clause) sets the limits; without it this does nothing.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
import threading
from contextlib import contextmanager

_LOCK = threading.Lock()
_STATE = {"depth": 0, "limiter": None, "available": True}


def _controller():
    """A fresh view of the BLAS libraries loaded now (about 2 ms; a library loaded later, such as scipy's,
    would escape one kept from before)."""
    if not _STATE["available"]:
        return None
    _preload_scipy_blas()
    try:
        from threadpoolctl import ThreadpoolController
        return ThreadpoolController()
    except Exception:                     # not installed, or a platform it cannot inspect
        _STATE["available"] = False
        return None


@contextmanager
def single_blas():
    """BLAS at one thread for the duration of the block (see the module docstring)."""
    with _LOCK:
        if _STATE["depth"] == 0:
            ctl = _controller()
            _STATE["limiter"] = ctl.limit(limits=1, user_api="blas") if ctl is not None else None
        _STATE["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["depth"] -= 1
            if _STATE["depth"] == 0 and _STATE["limiter"] is not None:
                _STATE["limiter"].restore_original_limits()
                _STATE["limiter"] = None


def _preload_scipy_blas() -> None:
    """scipy's wheels bundle an OpenBLAS of their own (``scipy.libs/libscipy_openblas*.so``), which loads with
    scipy.linalg; a fit with one grouping factor never imports scipy.linalg (:mod:`fedglmm.model.deferred`),
    but one with several, or scipy.optimize, imports it during the fit, inside the block, where its BLAS
    would run with as many threads as cores.  So the library alone is loaded first (a few ms, once): the
    limit then covers it, and scipy.linalg, when it comes, uses the same one.  Elsewhere (scipy linked to
    the BLAS numpy uses, or a layout without that folder) nothing is loaded."""
    if _STATE.get("preloaded") or "scipy.linalg" in sys.modules:
        return
    _STATE["preloaded"] = True
    try:
        spec = importlib.util.find_spec("scipy")
        if spec is None or spec.origin is None:
            return
        for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "scipy.libs",
                                                  "libscipy_openblas*.so*"))):
            ctypes.CDLL(path)
    except (OSError, ImportError, ValueError):
        pass
