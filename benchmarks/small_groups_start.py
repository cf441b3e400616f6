#!/usr/bin/env python3
"""The hybrid's start and rounds where every group is under the sites' minimum size: with the sites' small
groups pooled in bins (``site/pooled.py``, the default) and without (``min_pooled = 0``).

usage: python3 benchmarks/small_groups_start.py [--seeds 1,2,3] [--shape "visits, SD 4"]

Data: a longitudinal shape of ``stress_shapes.py`` (default the binary follow-up: 294 subjects x 7 visits
over 3 sites, SD 4, treatment x time, 12 % of visits missed): no group reaches min_group, so no group's own
summaries go.  Without bins the start is the sites' own fits combined; with them, the same fits combined in
the shape of the pseudo-groups the coordinator draws from the bins.  Printed per seed, for both: the
rounds, and the Newton decrement gᵀH⁻¹g from the pooled optimum at the best start tried in the first
Newton round (four rounds need about 0.3 on this shape).
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd

import fedglmm
import fedglmm.methods.hybrid as hybrid
from fedglmm import SiteConfig
from fedglmm.likelihood.engine import make_engine
from fedglmm.model.design import build_design, describe_frame
from fedglmm.model.spec import Schema

from stress_shapes import SHAPES, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--shape", default="visits, SD 4")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    name, kw = next((n, k) for n, k in SHAPES if n.startswith(args.shape))
    seen = {}
    original = hybrid._starts

    def capture(req, st, merged, own, pseudo, *rest):
        out = original(req, st, merged, own, pseudo, *rest)
        seen.update(req=req, st=st, starts=out[0])
        return out

    hybrid._starts = capture
    without = replace(SiteConfig.permissive(), min_pooled=0)
    print(f"{'seed':>4} {'rounds':>6} {'no bins':>7} {'start':>10} {'no bins':>10}")
    for seed in (int(s) for s in args.seeds.split(",")):
        rng = np.random.default_rng(seed)
        for shape, k in SHAPES:             # the same stream as stress_shapes.py
            formula, df = simulate(rng, **k)
            if shape == name:
                break
        sites = {f"s{j}": part for j, part in df.groupby("site")}
        out = []
        for config in (None, without):
            res = fedglmm.fit(formula, sites, family=kw["family"], site_config=config)
            out += [res.rounds, _decrement(seen, df)]
        print(f"{seed:4d} {out[0]:6d} {out[2]:7d} {out[1]:10.3g} {out[3]:10.3g}")
    hybrid._starts = original


def _decrement(seen: dict, df: pd.DataFrame) -> float:
    """The smallest positive Newton decrement from the pooled optimum over the starts the fit tried."""
    req, st = seen["req"], seen["st"]
    desc = describe_frame(df, req.spec, "all")
    schema = Schema(kinds=dict(desc["columns"]), levels=dict(desc["levels"]), transforms={})
    d = build_design(req.spec, schema, df.sort_values("g", kind="stable").reset_index(drop=True), req.family, "all")
    pooled = make_engine(d, req.family, 1, "observed", st.A, st.zs)
    starts = seen["starts"] if isinstance(seen["starts"][0], tuple) else (seen["starts"],)
    best = np.inf
    for a in starts:
        s = pooled.sums(np.r_[a[0], a[1]])
        g, H = -s["grad"], -s["hess"]
        dec = float(g @ np.linalg.solve(H, g))
        best = min(best, dec) if dec > 0 else best
    return best


if __name__ == "__main__":
    main()
