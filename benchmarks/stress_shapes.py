#!/usr/bin/env python3
"""Data of the shapes registries and multi-centre studies have, fitted by the hybrid and iterative
methods: rounds, and the largest difference between the two fits.

usage: python3 benchmarks/stress_shapes.py [--seeds 1,2,3]

Shapes (each drawn afresh per seed): many sites with few groups each (30 sites of 5 groups, binary; 25
sites of 4 groups, counts), rare events (an intercept of -3.5 on the logit scale), a large random-effect
variance (poisson, SD 2), a 12-level factor, a correlated random slope over 6 sites, large groups (200
rows), every site with 100 groups (counts), and two longitudinal shapes whose groups are all below the
sites' minimum size: 294 subjects x 7 visits over 3 sites, binary, a random-intercept SD of 4, treatment x
time (the shape of a dermatology trial's follow-up), and 60 subjects x 4 visits of counts; 12 % of the
visits missed.  Groups are dealt to sites by label (g mod sites); the
sites keep the default rules (groups under 10 rows send no summaries).  The hybrid should take at most 4
rounds and agree with the iterative fit to 1e-8.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm

SHAPES = [
    ("many sites, few groups", dict(G=150, m=20, sites=30, family="binomial")),
    ("many sites, counts", dict(G=100, m=15, sites=25, family="poisson")),
    ("rare events", dict(G=60, m=40, sites=4, family="binomial", b0=-3.5)),
    ("large variance, counts", dict(G=40, m=20, sites=3, family="poisson", sd=2.0)),
    ("factor with 12 levels", dict(G=80, m=25, sites=5, family="binomial", nlev=12)),
    ("random slope, 6 sites", dict(G=120, m=15, sites=6, family="binomial", slope=True)),
    ("large groups", dict(G=60, m=200, sites=3, family="binomial")),
    ("100 groups at every site", dict(G=300, m=30, sites=3, family="poisson")),
    ("visits, SD 4, binary", dict(G=294, m=7, sites=3, family="binomial", sd=4.0, b0=-1.6, visits=True)),
    ("visits, 60 groups, counts", dict(G=60, m=4, sites=3, family="poisson", sd=0.5, b0=1.5, visits=True)),
]


def simulate(rng, G, m, sites, family, sd=0.8, slope=False, b0=-0.5, nlev=0, visits=False) -> tuple[str, pd.DataFrame]:
    g = np.repeat(np.arange(G), m)
    x = rng.normal(size=g.size)
    if visits:       # longitudinal: x is the visit's time, a treatment per subject, and their interaction
        x = np.tile(np.arange(m), G) * 1.5 / (m - 1) * 3 + rng.normal(0, 0.2, g.size)
        trt = (np.arange(G) % 2)[g]
    f = rng.integers(0, max(nlev, 1), g.size)
    b, bs = rng.normal(0, sd, G), (rng.normal(0, 0.4, G) if slope else np.zeros(G))
    eta = b0 + 0.5 * x + b[g] + bs[g] * x + (0.3 * (f % 3) if nlev else 0.0)
    if visits:
        eta = b0 - 0.1 * trt - 0.4 * x - 0.14 * trt * x + b[g]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y, "x": x, "g": g, "f": [f"l{v:02d}" for v in f], "site": g % sites})
    formula = "y ~ x + " + ("factor(f) + " if nlev else "") + ("(1 + x | g)" if slope else "(1 | g)")
    if visits:       # and 12 % of the visits missed (every group then has 7 rows or fewer)
        df["trt"] = trt
        formula = "y ~ trt * x + (1 | g)"
        df = df[rng.random(len(df)) > 0.12].reset_index(drop=True)
    return formula, df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3")
    args = ap.parse_args()
    print(f"{'seed':>4}  {'shape':26s} {'hybrid':>6} {'iterative':>9} {'max_diff':>9}")
    worst, rounds = 0.0, []
    for seed in (int(s) for s in args.seeds.split(",")):
        rng = np.random.default_rng(seed)
        for name, kw in SHAPES:
            formula, df = simulate(rng, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                h = fedglmm.fit(formula, df, family=kw["family"], site="site")
                it = fedglmm.fit(formula, df, family=kw["family"], site="site", method="iterative")
            diff = max(float(np.max(np.abs(h.fixef.to_numpy() - it.fixef.to_numpy()))),
                       float(np.max(np.abs(np.asarray(h.theta) - np.asarray(it.theta)))),
                       abs(h.loglik - it.loglik) / max(1.0, abs(it.loglik)))
            worst, rounds = max(worst, diff), rounds + [h.rounds]
            print(f"{seed:4d}  {name:26s} {h.rounds:6d} {it.rounds:9d} {diff:9.1e}")
    print(f"hybrid rounds: median {np.median(rounds):g}, max {max(rounds)}, > 4 in {sum(r > 4 for r in rounds)} "
          f"of {len(rounds)}; largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
