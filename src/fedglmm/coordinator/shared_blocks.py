"""Gaussian models of one grouping factor whose levels are at several sites: the one-shot round's per-group
sums of each (site, level) cell added up by level, so that the exact fit from per-group sufficient
statistics (:func:`fedglmm.coordinator.virtual.stand_ins`) is the pooled one.

A gaussian site sends, for each of its groups that its rules let go, the cross-products n, XᵀX, Xᵀy, yᵀy,
ZᵀX, ZᵀZ and Zᵀy over the group's rows (:mod:`fedglmm.site.summaries`).  Where a level is at several sites,
each site's are the sums over its own rows of that level, and the level's sums over all its rows are their
total: the likelihood of a gaussian LMM is a function of these per-level totals alone.  Each level's total
goes to one site's stand-in (the first site holding it, in the order of the replies); the other sites keep
their set-up sums and their own levels.  Nothing is asked of the sites beyond the one-shot round: the
sums were sent for the one-shot fit anyway, and a cell the rules withheld leaves the fit to the rounds."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .messages import BLOCK_AXES, Merged


def merge_shared_levels(merged: Merged, moments: bool = False) -> Merged | None:
    """``merged`` with each shared level's per-group sums added up over its sites (see the module
    docstring), or None where that does not give the pooled fit: not gaussian (unless ``moments``), no
    shared level, a site withheld groups or sent none, several grouping factors (per-cell sums).
    ``moments``: a GLMM's too, whose per-group moment sums add up alike (the pseudo-data of each level are
    then drawn from all its rows' moments: a start, not the fit)."""
    if merged.family.name != "gaussian" and not moments or not merged.schema.shared or merged.refused \
            or not merged.mask.shape[0]:
        return None
    blocks = merged.blocks
    if any(b is None or "levels" not in b for b in blocks.values()):
        return None
    keys = BLOCK_AXES if merged.family.name == "gaussian" else ("n", "moments")
    if any(k not in b for b in blocks.values() for k in keys) \
            or len({str(b.get("variables")) for b in blocks.values()}) > 1:
        return None
    sids = list(blocks)
    named = [lv for sid in sids for lv in blocks[sid]["levels"]]
    owner = np.repeat(np.arange(len(sids)), [len(blocks[sid]["levels"]) for sid in sids])
    _, first, inverse = np.unique(np.array([str(lv) for lv in named], dtype=object), return_index=True,
                                  return_inverse=True)
    totals = {}
    for key in keys:
        stacked = np.concatenate([np.asarray(blocks[sid][key], float) for sid in sids])
        total = np.zeros((len(first),) + stacked.shape[1:])
        np.add.at(total, inverse, stacked)
        totals[key] = total
    order = np.argsort(first, kind="stable")             # levels in the order the replies first name them
    out = {}
    for i, sid in enumerate(sids):
        mine = order[owner[first[order]] == i]
        out[sid] = {**blocks[sid], "levels": [named[first[j]] for j in mine],
                    **{key: totals[key][mine] for key in keys}}
    if merged.family.name != "gaussian":
        # (a GLMM's stand-ins are drawn per site: a site left without levels has none)
        out = {sid: b if b["levels"] else None for sid, b in out.items()}
    # (each level counted once: at the site its total went to)
    setup = {sid: dict(merged.setup[sid], ngroups=len(out[sid]["levels"]) if out[sid] else 0) for sid in sids}
    return replace(merged, blocks=out, setup=setup)



ONE_SHOT_NOTE = "fitted exactly from the one-shot round: the sites' sums over each level's rows added up by the " \
    "coordinator"
