"""The sites' one-shot messages at the coordinator: read back from the readable files, checked against
the fit, and mapped from each site's own coding (a column per factor level it has) to the agreed design."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..model.families import Family
from ..model.formula import parse_formula
from ..model.spec import Schema
from .schema import global_names, merge_schema

# the axes of each summed quantity: x = fixed-effect column, z = random-effect column, g = group
SUM_AXES = {"colsum": "x", "colsq": "x", "xtx": "xx", "ztz": "zz",
            "st_xvx": "xx", "st_xv": "x", "st_xy": "x", "st_sy": "", "st_sv": "",
            "st_aa": "zz", "st_ab": "zz", "st_bb": "zz", "st_at": "zzx", "st_bt": "zzx", "st_tt": "zxzx",
            "st_ww": "zzzz", "st_w": "zz", "xtwx": "xx", "xtwz": "x",
            "mom_ss": "zz", "mom_st": "zzx", "mom_tt": "zxzx", "mom_ww": "zzzz", "mom_w": "zz",
            "xty": "x", "yty": "",
            "mom_w2": "zz", "st_wxx": "xx", "st_wxz": "x", "st_wzz": "", "st_wdf": "", "st_z1": "", "st_z2": "",
            "ldw": ""}
BLOCK_AXES = {"n": "g", "XtX": "gxx", "Xty": "gx", "yty": "g", "ZtX": "gzx", "ZtZ": "gzz", "Zty": "gz"}


def from_jsonable(obj: dict) -> dict:
    """Back from :func:`to_jsonable` (lists to arrays where the engine needs arrays)."""
    msg = dict(obj)
    msg.pop("about", None)
    msg["theta_mask"] = np.asarray(msg["theta_mask"], bool).reshape(len(msg["z_names"]), len(msg["z_names"]))
    msg["sums"] = {k: np.asarray(v, float) for k, v in msg["sums"].items()}
    if msg.get("groups"):
        msg["groups"] = {k: (v if k in ("levels", "variables", "cells") else np.asarray(v, float))
                         for k, v in msg["groups"].items()}
    return msg


@dataclass
class Merged:
    spec: object
    schema: Schema
    family: Family
    names: list
    znames: list
    mask: np.ndarray
    setup: dict            # per site: a set-up reply in the agreed coding
    blocks: dict           # per site: its per-group blocks in the agreed coding (or None)
    refused: list
    unsupported: bool = False   # a site sent no per-group summaries because the model has none to send
    own: dict = field(default_factory=dict)   # per site: its own fit (the hybrid's start), in the agreed coding
    pooled: dict = field(default_factory=dict)   # per site: its pooled small groups (binomial; site/pooled.py)


def _remap(arr, axes: str, xmap: np.ndarray, zmap) -> np.ndarray:
    """The array in the agreed coding; ``zmap`` is one map for every z axis, or a list (the z axes in turn)."""
    arr = np.asarray(arr, float)
    zmaps = list(zmap) if isinstance(zmap, list) else None
    for ax, kind in enumerate(axes):
        if kind not in "xz":
            continue
        m = xmap if kind == "x" else (zmaps.pop(0) if zmaps is not None else zmap)
        arr = np.take(arr, np.maximum(m, 0), axis=ax)
        index = [slice(None)] * arr.ndim
        index[ax] = m < 0
        arr[tuple(index)] = 0.0
    return arr


def _factor_sums(m: dict, znames: list, zgroups: list, xmap: np.ndarray) -> dict:
    """A site's per-factor set-up sums (keys ``base.i``, and ``base.i.k`` for a pair of factors whose axes
    a, d belong to factor i and b, c to factor k) in the agreed coding."""
    factors = list(dict.fromkeys(zgroups))
    fmaps = []
    for g in factors:
        own = [j for j, zg in enumerate(m.get("z_groups", [])) if zg == g]
        fmaps.append(_zmap([znames[j] for j, zg in enumerate(zgroups) if zg == g], [],
                           [m["z_names"][j] for j in own], []))
    out = {}
    for key, v in m["sums"].items():
        base, *idx = key.split(".")
        if base not in SUM_AXES or not idx or not all(i.isdigit() for i in idx):
            continue
        i, k = int(idx[0]), int(idx[-1])
        zmaps = [fmaps[i], fmaps[k], fmaps[k], fmaps[i]] if len(idx) == 2 else [fmaps[i]] * 4
        out[key] = _remap(v, SUM_AXES[base], xmap, zmaps)
    return out


def _zmap(znames, zgroups, site_names, site_groups) -> np.ndarray:
    """Each agreed Z column's position in a site's own coding (-1: the site has no such column), by
    (grouping factor, name) when there are several factors."""
    ours = list(zip(zgroups, znames)) if zgroups else list(znames)
    theirs = list(zip(site_groups, site_names)) if zgroups else list(site_names)
    return np.array([theirs.index(nm) if nm in theirs else -1 for nm in ours], dtype=np.int64)


def merge_messages(messages: dict, formula: str, family: Family, transforms: dict | None = None,
                   spec=None) -> Merged:
    """The sites' one-shot messages in the agreed coding (``transforms``: the pooled state of the formula's
    stateful transforms, from the round before: :func:`fedglmm.coordinator.rounds.pooled_transforms`;
    ``spec``, default the formula's: names the weights and offset columns the summaries were made with)."""
    spec = parse_formula(formula) if spec is None else spec
    for sid, m in messages.items():
        if m.get("kind") != "oneshot":
            raise InputError(f"site '{sid}': not a one-shot summary")
        if " ".join(m["formula"].split()) != " ".join(formula.split()) or m["family"] != family.name \
                or m["link"] != family.link:
            raise InputError(f"site '{sid}': its summaries were made for '{m['formula']}' ({m['family']}, "
                             f"{m['link']}), not for '{formula}' ({family.name}, {family.link})")
        for key, want in (("weights", spec.weights), ("offset", spec.offset_column)):
            if m.get(key) != want:
                raise InputError(f"site '{sid}': its summaries were made with {key} "
                                 f"{m.get(key) or 'none'}, not {want or 'none'}")
    orders = {m["order"] for m in messages.values()}
    if len(orders) > 1:
        raise InputError(f"the sites' summaries use different moment orders: {sorted(map(str, orders))}")
    schema = merge_schema({sid: m["description"] for sid, m in messages.items()}, spec, family, transforms)
    names, znames, mask, zgroups = global_names(spec, schema, family)
    setup, blocks, refused, own, pooled = {}, {}, [], {}, {}
    for sid, m in messages.items():
        xmap = np.array([m["x_names"].index(nm) if nm in m["x_names"] else -1 for nm in names], dtype=np.int64)
        zmap = _zmap(znames, zgroups, m["z_names"], m.get("z_groups", []))
        # with secure aggregation the site totals come masked in a set-up round instead (none here)
        sums = {k: _remap(v, SUM_AXES[k], xmap, zmap) for k, v in (m.get("sums") or {}).items() if k in SUM_AXES}
        if zgroups and m.get("sums"):
            sums.update(_factor_sums(m, znames, zgroups, xmap))
        setup[sid] = {"n": m["n"], "ngroups": m["ngroups"], "x_names": names, "z_names": znames,
                      "theta_mask": mask, **({"z_groups": zgroups} if zgroups else {}), **sums}
        if m.get("refused"):
            refused.append(m["refused"])
        if m.get("local") is not None:
            own[sid] = _own_fit(m["local"], xmap, zmap)
        if m.get("pooled"):
            pooled[sid] = {k: (v if k == "variables" else np.asarray(v, float)) for k, v in m["pooled"].items()}
        g = m.get("groups")
        if not g:
            blocks[sid] = None
        elif "S" in g:                                    # gaussian, several grouping factors: cells
            q_site = len(m["z_names"])
            idx = np.r_[zmap, np.where(xmap >= 0, xmap + q_site, -1), q_site + len(m["x_names"])]
            blocks[sid] = {"cells": g["cells"], "n": np.asarray(g["n"], float),
                           "S": _remap(g["S"], "gzz", np.zeros(0, np.int64), [idx, idx])}
        elif family.name == "gaussian":
            blocks[sid] = {"levels": list(g["levels"]),
                           **{k: _remap(g[k], BLOCK_AXES[k], xmap, zmap) for k in BLOCK_AXES}}
        else:
            blocks[sid] = dict(g, x_names=m["x_names"], z_names=m["z_names"])
    return Merged(spec, schema, family, names, znames, mask, setup, blocks, refused,
                  any(m.get("unsupported") for m in messages.values()), own, pooled)


def _own_fit(local: dict, xmap, zmap) -> dict:
    """A site's own fit; sent as information sums in its own coding (:mod:`fedglmm.site.own_fit`), mapped to
    the agreed one."""
    if "xinfo" not in local:
        return local
    return dict(local, xinfo=_remap(local["xinfo"], "xx", xmap, zmap), xinfo_b=_remap(local["xinfo_b"], "x", xmap, zmap))
