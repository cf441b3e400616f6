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

from ..likelihood.fit import diagonal_positions
from .starts import OwnPart, _log_combination, internal_fits


def factor_log_start(st, own: list) -> list:
    """[(γ, θ̃ and ψ)]: the log-scale information combination of the fits in ``own`` (as sent) that are of the
    full model and coded as agreed (β of the agreed columns, the agreed Z columns, no factor left out), or []
    with fewer than two such fits."""
    p = len(st.names)
    full = [loc for loc in own if not loc.get("alone") and loc.get("info") is not None
            and list(loc.get("names", [])) == list(st.names) and list(loc.get("z_names", [])) == list(st.znames)]
    parts = [OwnPart(K, K @ x, x, float(loc.get("n", 0.0))) for loc, K, x in internal_fits(st, full)]
    if len(parts) < 2:
        return []
    y = _log_combination(parts, p + diagonal_positions(st.mask))
    return [] if y is None else [(y[:p], y[p:])]
