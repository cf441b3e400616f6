"""The conditional modes a site's own fit sends with several grouping factors (binomial, poisson): each factor's
levels with at least ``min_group`` observations, their modes and SDs on the user's scale -- where levels are
shared by sites they start the shared effects (:func:`fedglmm.coordinator.own_combination.shared_level_modes`)."""
from __future__ import annotations

import numpy as np

from ..errors import FedGLMMError
from ..model.families import Family
from ..model.spec import Design
from .rules import factor_sizes


def factor_modes(engine, design: Design, family: Family, x: np.ndarray, zs: np.ndarray) -> dict:
    """Each factor's levels, their sizes and their modes and SDs at ``x`` (user's scale: ``zs`` the fit's Z scale),
    as {"factor_modes": {factor: (levels, sizes, modes, SDs)}}, or {} where the engine could not give them there
    (the fit itself still goes)."""
    try:
        b, sd = engine.conditional_modes(x)
    except (FedGLMMError, np.linalg.LinAlgError, ArithmeticError, ValueError):
        return {}
    if not isinstance(b, dict):                 # (one factor left: the fit left out a factor it holds one level of)
        b, sd = ({f.name: a for f in design.groupings} for a in (b, sd))
    sizes = factor_sizes(design, family)
    return {"factor_modes": {f.name: (list(f.levels), sizes[f.name], b[f.name] / zs[f.columns],
                                      sd[f.name] / zs[f.columns]) for f in design.groupings}}


def big_levels(modes: dict, min_group: float) -> dict:
    """The modes and SDs of the levels with at least ``min_group`` observations (and finite modes and SDs), by
    factor: {factor: {"levels", "modes", "condsd"}}, from :func:`factor_modes`' ``modes``."""
    out = {}
    for name, (levels, size, b, sd) in modes.items():
        finite = np.all(np.isfinite(np.c_[b, sd]), axis=1)
        keep = (np.asarray(size) >= min_group) & finite
        out[name] = {"levels": [lv for lv, k in zip(levels, keep) if k], "modes": np.asarray(b)[keep],
                     "condsd": np.asarray(sd)[keep]}
    return out
