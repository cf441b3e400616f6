#!/usr/bin/env python3
"""How far the hybrid's start is from the pooled optimum when every group is under the sites' minimum size,
and how far it would be with a one-shot block of the small groups binned by (size, count of positive rows).

usage: python3 benchmarks/small_groups_start.py [--seeds 1,2,3] [--min-bin 3]

Data: the binary follow-up shape of ``stress_shapes.py`` (294 subjects x 7 visits over 3 sites, SD 4,
treatment x time, 12 % of visits missed): no group reaches min_group, so no group's summaries go and the
start is the sites' own fits combined (``coordinator/starts.py``).  The experiment (not a protocol: the
sites' rows are read here directly) bins each site's groups by (size, count of positive rows), merging
counts within a size until a bin holds ``--min-bin`` groups, and draws pseudo-groups per bin from what such
a block would send: its number of groups, its rows' pooled moments of time and of time with the outcome
within groups, and the share of treated groups.  Those pseudo-data then shape the combination of the
sites' own fits, as the hybrid's pseudo-data of other groups do.  Printed per seed: the hybrid's rounds, the
Newton decrement gᵀH⁻¹g at today's best start and at the binned-shape start (four rounds need about 0.3).
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm
import fedglmm.methods.hybrid as hybrid
from fedglmm.coordinator.starts import combined_start
from fedglmm.likelihood.engine import make_engine
from fedglmm.likelihood.fit import diagonal_positions
from fedglmm.model.design import build_design, describe_frame
from fedglmm.model.spec import Schema

from stress_shapes import SHAPES, simulate


def binned(df: pd.DataFrame, rng, min_bin: int) -> pd.DataFrame:
    """Pseudo-groups of one site's groups binned by (size, count of positive rows)."""
    key = pd.DataFrame({"n": df.groupby("g").size(), "c": df.groupby("g")["y"].sum()})
    out = []
    for n, sub in key.groupby("n"):
        bins, cur = [], []
        for c in sorted(sub.c.unique()):
            cur += list(sub.index[sub.c == c])
            if len(cur) >= min_bin:
                bins.append(cur)
                cur = []
        if cur:
            bins[-1:] = [(bins[-1] if bins else []) + cur]
        for b in bins:
            rows = df[df.g.isin(b)]
            k, counts = len(b), rows.groupby("g")["y"].sum().to_numpy()
            treated = int(round(rows.groupby("g")["trt"].first().sum()))
            tm, tv = rows.x.mean(), rows.x.var() if len(rows) > 1 else 0.0
            yc = rows.y - rows.groupby("g")["y"].transform("mean")
            cov, vy = float(((rows.x - tm) * yc).mean()), float((yc ** 2).mean())
            slope = cov / vy if vy > 0 else 0.0
            c = int(round(counts.mean()))
            for j in range(k):
                y = np.r_[np.ones(c), np.zeros(int(n) - c)]
                x = tm + slope * (y - y.mean()) + rng.normal(0, np.sqrt(max(tv - slope * cov, 1e-6)), int(n))
                out.append(pd.DataFrame({"y": y, "trt": int(j < treated), "x": x, "g": len(out)}))
    return pd.concat(out, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--min-bin", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    name, kw = next((n, k) for n, k in SHAPES if n.startswith("visits, SD 4"))
    seen = {}
    original = hybrid._starts

    def capture(req, st, merged, own, pseudo, big=False):
        out = original(req, st, merged, own, pseudo, big)
        seen.update(req=req, st=st, own=own, starts=out[0])
        return out

    hybrid._starts = capture
    print(f"{'seed':>4} {'rounds':>6} {'start now':>10} {'binned':>8}")
    for seed in (int(s) for s in args.seeds.split(",")):
        rng = np.random.default_rng(seed)
        for shape, k in SHAPES:             # the same stream as stress_shapes.py
            formula, df = simulate(rng, **k)
            if shape == name:
                break
        sites = {f"s{j}": part for j, part in df.groupby("site")}
        res = fedglmm.fit(formula, sites, family="binomial")
        req, st, own = seen["req"], seen["st"], seen["own"]
        desc = describe_frame(df, req.spec, "all")
        schema = Schema(kinds=dict(desc["columns"]), levels=dict(desc["levels"]), transforms={})

        def engine(frame):
            d = build_design(req.spec, schema, frame.sort_values("g", kind="stable").reset_index(drop=True),
                             req.family, "experiment")
            return make_engine(d, req.family, 1, "observed", st.A, st.zs)

        def F(x, eng):
            s = eng.sums(np.asarray(x, float))
            return -float(s["value"]), -s["grad"], -s["hess"]

        pooled = engine(df)

        def decrement(x):
            _, g, H = F(x, pooled)
            return float(g @ np.linalg.solve(H, g))

        starts = seen["starts"] if isinstance(seen["starts"][0], tuple) else (seen["starts"],)
        now = min(d for d in (decrement(np.r_[a[0], a[1]]) for a in starts) if d > 0)
        draw = np.random.default_rng(seed)
        engines = {sid: engine(binned(part, draw, args.min_bin)) for sid, part in sites.items()}
        each = {sid: (lambda x, e=e: F(x, e)) for sid, e in engines.items()}
        total = lambda x: tuple(map(sum, zip(*[F(x, e) for e in engines.values()])))   # noqa: E731
        p = len(st.names)
        new = combined_start(own, total, each, np.r_[starts[0][0], starts[0][1]], p + diagonal_positions(st.mask))
        print(f"{seed:4d} {res.rounds:6d} {now:10.3g} {decrement(new[0]) if new else float('nan'):8.3g}")
    hybrid._starts = original


if __name__ == "__main__":
    main()
