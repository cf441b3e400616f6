"""The hybrid's block for a site's small groups: groups too small for their own summaries, pooled in bins.

A binary or count outcome's groups below the site's minimum size send nothing of their own.  Where most
groups are small (a follow-up of a few visits per patient) the hybrid's start then misses what the groups
carry about the random-effect variance: how the groups' counts (of positive rows, or the count outcome's
totals) spread.  So, for the hybrid only, the site sorts its small groups by (size, count) into *bins* of at
least ``min_groups`` groups
(counts next to each other merged within a size until a bin is that large; a remainder joins the last bin
of its size) and sends, per bin, only sums over its groups:

* ``size`` (the mean rows of its groups), ``rows`` (their total) and ``k`` (how many groups);
* ``s1`` = Σ v and ``s2`` = Σ v vᵀ over the bin's rows, v = (outcome, the design's variables): the bin's
  pooled first and second moments;
* ``bd`` = Σ_g m_g² and ``by`` = Σ_g m_g,y m_g over its groups, m_g the group's mean of v: the groups'
  spread and each variable's group means against the outcome's, from which the coordinator tells
  group-level columns (a treatment, constant within a group) from row-level ones and draws them per group
  (not the whole between-group matrix Σ_g m_g m_gᵀ: with many variables, a few groups' means would be
  nearly pinned down by it).

The moment rule of per-group summaries holds for a bin too: its rows' values (k·size·d) are at least
twice the equations s1, s2 give (d + d(d+1)/2), and its groups' means (k·d) at least twice the equations
s1, bd, by give (3d − 1): a bin has at least max(``min_groups``, ⌈2(3d − 1)/d⌉) groups.

What this reveals is a frequency table of the small groups by (size, count) with every cell of at least
``min_groups`` groups, and pooled moments within each cell -- the table statistical offices publish under a
minimum cell size.  A cell whose groups all share one count tells that count of each of its groups, but
not which groups they are; so where *all* the groups of a size would fall in one bin and share one count
(whoever knows a group's size would learn its count), that size is not sent.  The rule ``min_pooled`` of
``site.toml`` sets ``min_groups`` (0: no bins).  Only for binary (0/1) and poisson outcomes without weights,
one grouping factor; the coordinator uses the bins for the hybrid's start and step model, never as a fit.

Where bins of one size would hold under ``COVER`` of the small groups (groups of many sizes, few of each:
pseudo-groups for the few binned would misshape the start more than none), the bins are made over
neighbouring sizes instead: consecutive sizes form classes of at least 2·``min_groups`` groups (a remainder
joins the last class), and each class is sorted by the groups' share of positive rows and cut into bins
of at least ``min_groups`` groups where the share changes.  Such a bin sends the same sums, its sizes only
as their total; a class whose groups all share one share of positive rows is not sent (whoever knows a
group is in it would learn its share), nor are any bins when there are fewer than 2·``min_groups`` small
groups.  (Many sites of a dozen subjects each: a binary follow-up over 25 sites took 5-6 rounds without
these bins and 4 with them, ``benchmarks/follow_up_rounds.py``.)  Counts go in bins of one size only: a bin
of neighbouring sizes gives the coordinator its rows' moments weighted by size beside its groups' unweighted
means, which misshaped the start and step model of grouseticks over 3 sites (4 rounds without them, 9 with, 6
with them once a model whose final step falls short gives way to Newton's; its 54 small locations).
"""
from __future__ import annotations

import numpy as np

from ..model.options import POOLED_MAX_GROUPS
from ..model.spec import Design

COVER = 0.8          # the least share of the small groups bins of one size must hold, or bins of neighbouring
                     # sizes are made instead


def pooled_bins(d: Design, starts: np.ndarray, small: np.ndarray, min_groups: int, variables,
                count_outcome: bool = False) -> dict | None:
    """The bins of the groups marked ``small`` (see the module docstring), or None when none can be sent.

    ``starts``: the first row of each group (rows sorted by group); ``variables``: (names, V) with the
    outcome in column 0 (:func:`fedglmm.site.summaries.moment_variables`); ``count_outcome``: the outcome is a
    count (poisson), whatever its values at this site."""
    if min_groups <= 0 or not small.any() or d.weighted or not np.all(d.trials == 1.0) or len(d.factors) > 1 \
            or small.sum() > POOLED_MAX_GROUPS:
        return None                      # (so many small groups: the coordinator would not draw them)
    names, V = variables
    dim = V.shape[1]
    min_groups = max(int(min_groups), int(np.ceil(2.0 * (3 * dim - 1) / dim)))
    rows_needed = 2.0 * (dim + dim * (dim + 1) / 2) / dim
    sizes = np.diff(np.r_[starts, d.n])
    counts = np.add.reduceat(d.y, starts)      # positive rows (binary) or the group's total count
    bins = []
    for size in np.unique(sizes[small]):
        idx = np.flatnonzero(small & (sizes == size))
        idx = idx[np.argsort(counts[idx], kind="stable")]
        _, many = np.unique(counts[idx], return_counts=True)
        cuts = _cuts(many, many * size, min_groups, rows_needed)
        if not cuts or len(many) == 1:
            continue                 # fewer than min_groups groups of this size, or all of one count
        bins += [idx[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
    if sum(len(i) for i in bins) < COVER * small.sum():
        if count_outcome:
            return None                  # counts: bins of one size only (see the module docstring)
        bins = _mixed_bins(np.flatnonzero(small), sizes, counts, min_groups, rows_needed)
        if not bins:
            return None                  # pseudo-groups for a few of the small groups would skew the start
    return _bin_sums(V, starts, sizes, bins, names)


def _mixed_bins(idx: np.ndarray, sizes, counts, min_groups: int, rows_needed: float) -> list:
    """Groups of neighbouring sizes together: classes of consecutive sizes holding at least 2·``min_groups``
    groups each (a remainder joins the last), each sorted by the groups' share of positive rows and cut
    into bins of at least ``min_groups`` groups where the share changes (a remainder joins the last bin);
    a class whose groups all have one share is left out."""
    idx = idx[np.lexsort((counts[idx] / sizes[idx], sizes[idx]))]
    _, per_size = np.unique(sizes[idx], return_counts=True)
    ends = _cuts(per_size, np.zeros(len(per_size)), 2 * min_groups, 0.0)
    bins = []
    for a, b in zip([0] + ends[:-1], ends):
        part = idx[a:b]
        share = counts[part] / sizes[part]
        part, share = part[np.argsort(share, kind="stable")], np.sort(share, kind="stable")
        _, first, many = np.unique(share, return_index=True, return_counts=True)
        cuts = _cuts(many, np.add.reduceat(sizes[part], first), min_groups, rows_needed)
        if len(many) > 1:
            bins += [part[c0:c1] for c0, c1 in zip([0] + cuts[:-1], cuts)]
    return bins


def _cuts(many, rows, min_groups: int, rows_needed: float) -> list:
    """Where to cut a sorted run of groups into bins: ``many`` groups (``rows`` rows) share each value in
    turn, and a bin closes at the end of a value once it holds ``min_groups`` groups and ``rows_needed``
    rows; the last bin takes the remainder.  The ends of the bins (none if no bin closes)."""
    cuts, acc, got = [], 0, 0.0
    for end, m, r in zip(np.cumsum(many), many, rows):
        acc, got = acc + int(m), got + float(r)
        if acc >= min_groups and got >= rows_needed:
            cuts.append(int(end))
            acc, got = 0, 0.0
    if cuts:
        cuts[-1] = int(np.sum(many))
    return cuts


def _bin_sums(V: np.ndarray, starts: np.ndarray, sizes: np.ndarray, bins: list, names) -> dict:
    """Per bin: size, rows, k, s1, s2, bd, by -- one product VᵀV over each bin's rows (no per-row outer
    products: memory O(rows · d))."""
    gsum = np.add.reduceat(V, starts, axis=0)                                  # (G, d) group sums
    mean = gsum / sizes[:, None]
    out = {"variables": list(names), "size": [], "rows": [], "k": [], "s1": [], "s2": [], "bd": [], "by": []}
    for idx in bins:
        rows = np.repeat(starts[idx], sizes[idx]) + (np.arange(int(sizes[idx].sum()))
                                                     - np.repeat(np.cumsum(sizes[idx]) - sizes[idx], sizes[idx]))
        Vb, m = V[rows], mean[idx]
        for key, val in (("size", float(sizes[idx].mean())), ("rows", float(len(rows))), ("k", float(len(idx))),
                         ("s1", gsum[idx].sum(axis=0)), ("s2", Vb.T @ Vb), ("bd", (m * m).sum(axis=0)),
                         ("by", (m * m[:, [0]]).sum(axis=0))):
            out[key].append(val)
    return {k: (v if k == "variables" else np.asarray(v, float)) for k, v in out.items()}
