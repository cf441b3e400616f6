"""The hybrid's gates: which start a fit takes from the one-shot round -- the sites' own fits alone
(:func:`_fits_suffice`), their combination shaped by pseudo-data not fitted (:func:`_lean`), the one-shot
fit as the estimate itself (:func:`exact_moments`; gaussian: :func:`_blocks_keep_digits`)."""
from __future__ import annotations

import numpy as np

from ..coordinator.pseudo.order2 import level_scatter
from ..coordinator.starts import OwnPart
from ..coordinator.virtual import factor_levels
from ..likelihood.fit import LOST_DIGITS, diagonal_positions
from ..model.moments import monomials
from ..model.options import CUT_SHORT_GROUPS, OWN_FIT_GROUPS

MANY_GROUPS = 5000         # groups in all beyond which the pseudo-data fit costs more than a round ...
SOME_GROUPS = 50           # ... when every site has this many groups (their fits alone then start)
EXACT_ROWS = 200_000       # pseudo rows (a 0/1 outcome's trials) up to which an exact one-shot fit is made


def _sd_index(st) -> np.ndarray:
    """Positions in (γ, θ̃) of the diagonal of Λ̃ (the standard deviations, up to the correlations)."""
    return len(st.names) + diagonal_positions(st.mask)


def _blocks_keep_digits(st) -> bool:
    """Whether a gaussian fit from the per-group sums (raw cross-products) keeps its digits: a covariate whose
    Σ(x − x̄)² is below ``LOST_DIGITS`` of its Σx² (the bound the gaussian fit holds its outcome to; a mean
    beyond 1e3 of its SDs from 0) leaves its centred cross-products to the cancellation of far larger terms
    (x ≈ 1e5 ± 1: the one-shot fit's logLik was 5e-4 off; 1e7 ± 1: its slope 6 % off).  The Newton rounds
    then finish the fit: the sites form their sums on the internal, centred scale."""
    n = float(st.n)
    colsum, colsq = (np.asarray(st.sums[k], float) for k in ("colsum", "colsq"))
    varying = np.array([nm != "Intercept" for nm in st.names]) & (colsq > 0)
    spread = colsq[varying] - colsum[varying] ** 2 / max(n, 1.0)
    return bool(np.all(spread > LOST_DIGITS * colsq[varying]))


def _fits_suffice(own: dict, replies: dict, merged, req, st) -> str | bool:
    """Whether the sites' own fits alone make the start (no pseudo-data fit at the coordinator, whose cost
    grows with the groups): a GLMM with one grouping factor, every site's fit in the agreed coding, every
    summary sent, no standard deviation near zero, and ("many") at least ``OWN_FIT_GROUPS`` groups at every
    site -- likelihoods that close to quadratic combine by their information to within a Newton step of the
    pooled optimum -- or ``MANY_GROUPS`` groups in all, ``SOME_GROUPS`` at every site: a pseudo-data fit over
    that many groups costs the coordinator more than the round it may save; or ("third") ``CUT_SHORT_GROUPS``
    at every site, each fit with its third derivatives along θ: combined to third order
    (:func:`~fedglmm.coordinator.starts.cubic_combination`) they start about as close (1e5 rows over 10 sites
    of 100 groups, ``benchmarks/bench_scale.py``: a decrement of 0.006, where the quadratic combination's is
    0.87 and the one shaped by pseudo-data 0.001), and their sum is the step model (a site with a bounded link
    sends none: with them, of the Gamma inverse-link draws of ``benchmarks/many_groups_rounds.py`` 2 of 24
    took 1-2 rounds more, and one ended 2e-5 SE from the pooled fit, 2e-7 before).  False otherwise."""
    if req.family.name == "gaussian" or len(req.spec.groups) > 1 or merged.refused or len(own) < len(replies):
        return False
    sizes = [int(r["ngroups"]) for r in replies.values()]
    many = min(sizes) >= OWN_FIT_GROUPS or sum(sizes) >= MANY_GROUPS and min(sizes) >= SOME_GROUPS
    third = min(sizes) >= CUT_SHORT_GROUPS and all(o.T is not None for o in own.values())
    if not (many or third) or not _all_clear(own, replies, st):
        return False
    return "many" if many else "third"


def _lean(own: dict, replies: dict, merged, req, st) -> bool:
    """Whether the pseudo-data only shape the combination of the sites' own fits, not fitted themselves:
    every site sent its fit (in the agreed coding) and every group's summaries (or its small groups pooled in
    bins), no site's standard deviation is near zero and there is no penalty -- the fits then combine to
    within a Newton step, and the pseudo-data fit at the coordinator costs more than it adds (on the binary
    follow-up of stress_shapes.py, seeds 1-20, the rounds are the same without it)."""
    if req.family.name == "gaussian" or _unbinned(replies, merged) or len(own) < len(replies) or req.options.penalty \
            or st.factor_groups:
        return False
    return _all_clear(own, replies, st)


def _unbinned(replies: dict, merged) -> bool:
    """Whether a site kept small groups' summaries without sending them pooled in bins."""
    return any(r.get("refused") and sid not in merged.pooled for sid, r in replies.items())


def _all_clear(own: dict, replies: dict, st) -> bool:
    """Whether every site's own fit mapped to the agreed coding (``own``: :func:`_own_parts`) with its standard
    deviations clear of zero."""
    return len(own) == len(replies) and all(_clear_of_zero(o, _sd_index(st)) for o in own.values())


def _clear_of_zero(part: OwnPart, idx) -> bool:
    """Whether a site's estimated standard deviations are all more than three of their standard errors from
    zero: near that boundary a likelihood is far from quadratic, and the fits alone combine badly."""
    try:
        se = np.sqrt(np.maximum(np.diag(np.linalg.pinv(part.K)), 0.0))[idx]
    except np.linalg.LinAlgError:
        return False
    return bool(np.all(np.abs(part.center[idx]) > 3.0 * se))


def exact_moments(merged, req, replies: dict) -> bool:
    """Whether the sites' order-2 sums carry the pooled likelihood itself, so that the one-shot fit (of
    uncompressed pseudo rows, by the fit's own options) is the estimate: a binomial or poisson model of one
    grouping factor, no penalty, every group's sums sent by every site (none withheld, none in bins), and
    every shared variable but the outcome constant within each level of the model's factor in every group
    (group-level columns, the factor's own 0/1 columns) -- the likelihood then depends on each group's counts
    and outcome totals by level alone, which the sums hold (:mod:`~fedglmm.coordinator.pseudo.order2`
    keeps them exactly).  Not beyond ``EXACT_ROWS`` pseudo rows."""
    if req.family.name not in ("binomial", "poisson") or req.options.penalty or len(req.spec.groups) != 1 \
            or merged.refused or merged.pooled or merged.unsupported or merged.schema.shared:
        return False
    blocks = [merged.blocks.get(sid) for sid in replies]
    if not blocks or any(b is None or "moments" not in b for b in blocks) \
            or sum(float(np.sum(b["n"])) for b in blocks) > EXACT_ROWS:
        return False
    for b in blocks:
        variables_, moments = list(b["variables"]), np.atleast_2d(np.asarray(b["moments"], float))
        expo = monomials(len(variables_), 2)
        if moments.shape[1] != len(expo):
            return False                     # (moments beyond order 2)
        ss, size = level_scatter(np.asarray(b["n"], float), moments, expo, factor_levels(variables_))
        if np.any(ss[:, 1:] > 1e-10 * np.maximum(size[:, 1:], 1e-300)):
            return False
    return True


def _kept_groups(reply: dict) -> int:
    """How many of a site's groups (one grouping factor) kept their summaries: its groups less those it sent."""
    return int(reply["ngroups"]) - (len(reply["groups"]["levels"]) if reply.get("groups") else 0)


def _kept_share(replies) -> float:
    """The share of the groups (one grouping factor) whose summaries stayed at their sites."""
    one = [r for r in replies.values() if not isinstance(r["ngroups"], dict)]
    total = sum(int(r["ngroups"]) for r in one)
    return sum(_kept_groups(r) for r in one) / total if total else 0.0
