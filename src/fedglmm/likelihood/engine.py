"""The engine interface: what every likelihood engine answers, at a site or at the coordinator.

An engine holds one part of the data (a site's rows, a site's per-group sufficient statistics, or
pseudo-data) on the coordinator's internal scale (:mod:`fedglmm.model.spec`) and answers

* ``sums(point, final=False) -> dict``: the sums at one point that add up over parts (``final``: the
  estimate, whose Hessian gives the standard errors; an engine may compute a cheaper one before) -- GLMMs: ``value``, ``grad``,
  ``hess`` of the log-likelihood in φ = (γ, θ̃); gaussian models: the cross-products A, b, c, d of the
  profiled criterion and their θ̃-derivatives (:mod:`fedglmm.likelihood.lmm`);
* ``modes(point, beta=None, sigma=None) -> (modes, sds)``: each group's conditional modes and
  conditional SDs on the internal scale (gaussian models need the profiled β̂ and σ̂ at the point).

:class:`~fedglmm.likelihood.laplace.GLMMLikelihood` and :class:`~fedglmm.likelihood.lmm.LMMSums` implement
it for one grouping factor (batched over groups), :class:`~fedglmm.likelihood.multilevel.MultiLevelGLMM` and
:class:`~fedglmm.likelihood.lmm_sparse.MultiLMMSums` for several (sparse; their ``modes`` are dictionaries
by factor), :class:`~fedglmm.likelihood.lmm_shared.SharedLMMSums` and
:class:`~fedglmm.likelihood.glmm_shared.SharedGLMMSums` for a gaussian or binomial/poisson model whose
grouping factors have levels at several sites; :func:`make_engine` builds the right one for a design, and :class:`EngineCache` keeps one per
internal scale, so an engine's warm-started modes survive from one request to the next.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from ..model.families import Family
from ..model.spec import Design
from .glmm_shared import SharedGLMMSums
from .laplace import GLMMLikelihood
from .lmm import LMMSums
from .lmm_shared import SharedLMMSums
from .lmm_sparse import MultiLMMSums
from .multilevel import MultiLevelGLMM
from .shared import SharedLayout


class Engine(Protocol):
    def sums(self, point: np.ndarray, final: bool = False) -> dict: ...

    def modes(self, point: np.ndarray, beta=None, sigma=None) -> tuple[np.ndarray, np.ndarray]: ...


def make_engine(design: Design, family: Family, nagq: int, curvature: str, transform: np.ndarray,
                zscale: np.ndarray, shared: dict | None = None) -> Engine:
    """The engine of ``design`` on the internal scale X̃ = X·transform, Z̃ = Z / zscale.  ``shared``: the
    levels of grouping factors held by several sites ({factor: [levels]}; gaussian, binomial and poisson)."""
    zs = zscale if len(zscale) else np.ones(design.Z.shape[1])
    d = replace(design, X=design.X @ transform, Z=design.Z / zs)
    if shared:
        layout = SharedLayout.from_payload(shared, {f.name: f.q for f in design.groupings})
        return SharedLMMSums(d, layout) if family.name == "gaussian" else SharedGLMMSums(d, family, layout)
    if design.factors:                 # several grouping factors: the sparse engines
        return MultiLMMSums(d) if family.name == "gaussian" else MultiLevelGLMM(d, family, curvature=curvature)
    if family.name == "gaussian":
        return LMMSums(d)
    return GLMMLikelihood(d, family, nagq, curvature=curvature)


class EngineCache:
    """One engine at a time, rebuilt only when the internal scale changes (``build(transform, zscale)``)."""

    def __init__(self, build):
        self._build = build
        self._engine = None
        self._key = None

    def get(self, transform, zscale) -> Engine:
        key = (np.asarray(transform, float), np.asarray(zscale if zscale is not None else np.ones(0), float))
        if self._engine is None or not all(np.array_equal(a, b) for a, b in zip(key, self._key)):
            self._engine = self._build(*key)
            self._key = key
        return self._engine

    def clear(self) -> None:
        self._engine, self._key = None, None
