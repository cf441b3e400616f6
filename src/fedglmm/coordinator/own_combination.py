"""With several grouping factors: the sites' own fits of the full model combined by their information.

A site that holds several levels of every factor fits its rows with the full model
(:func:`fedglmm.site.own_fit.own_factor_fit`) and sends β̂, θ̂ (and ψ̂) with their information I_s.  On the
internal scale x = (γ, θ̃, ψ) = T(β, θ, ψ) its log-likelihood is about −½ (x − x̂_s)ᵀ K_s (x − x̂_s), with
K_s = T⁻ᵀ I_s T⁻¹, and the pooled one about their sum, whose maximiser is the information-weighted mean of
the fits.  As with one grouping factor (:func:`fedglmm.coordinator.starts.combined_start`), the standard
deviations (the diagonal of each Λ̃) are combined on the log scale, where a site's likelihood is closer to
quadratic: a site with few levels has its SD's likelihood skewed, and weighted by its information alone it
pulls the mean towards zero.  This start is tried beside the one of
:func:`~fedglmm.coordinator.starts.factor_combined_start` (each factor's covariance averaged by levels, the
fixed effects by their marginal information), in the same first Newton round.
"""
from __future__ import annotations

import numpy as np

from ..likelihood.fit import diagonal_positions
from .starts import OwnPart, _log_combination


def factor_log_start(st, own: list) -> list:
    """[(γ, θ̃ and ψ)]: the log-scale information combination of the fits in ``own`` (as sent) that are of the
    full model and coded as agreed (β of the agreed columns, the agreed Z columns, no factor left out), or []
    with fewer than two such fits."""
    p = len(st.names)
    nx = p + int(st.mask.sum()) + st.ndisp
    T = st.internal_transform()
    Ti = np.linalg.inv(T)
    parts = []
    for loc in own:
        if loc.get("alone") or loc.get("info") is None or list(loc.get("names", [])) != list(st.names) \
                or list(loc.get("z_names", [])) != list(st.znames):
            continue
        try:
            K = Ti.T @ np.asarray(loc["info"], float) @ Ti
            x = T @ np.r_[np.asarray(loc["beta"], float), np.asarray(loc["theta"], float)]
        except (KeyError, ValueError, TypeError):
            continue
        if K.shape == (nx, nx) and np.all(np.isfinite(K)) and np.all(np.isfinite(x)):
            parts.append(OwnPart(K, K @ x, x, float(loc.get("n", 0.0))))
    if len(parts) < 2:
        return []
    y = _log_combination(parts, p + diagonal_positions(st.mask))
    return [] if y is None else [(y[:p], y[p:])]
