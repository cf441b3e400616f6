#!/usr/bin/env python3
"""Rounds of the hybrid on binary follow-ups whose every group is below the sites' minimum size.

usage: python3 benchmarks/follow_up_rounds.py [--seeds 1,2,3,4,5,6] [--iterative]

Per shape (subjects, visits, random-intercept SD, sites, intercept): subjects with ``visits`` visits at
times 0, 1, ..., 12 % of visits missed, a treatment per subject, logit η = b0 + b − 0.3 t − 0.4 trt·t with
b ~ N(0, SD²), subjects dealt round-robin to the sites; fitted as ``y ~ trt * time + (1 | id)`` with the
default site rules (min_group 10: every group is small, so only the pooled bins of ``site/pooled.py`` and
the sites' own fits carry the groups to the start).  Printed: the hybrid's rounds per seed (and with
``--iterative`` the iterative method's, and the largest difference between the two fits).
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm

FORMULA = "y ~ trt * time + (1 | id)"
SHAPES = [(100, 5, 2.0, 3, -1.0), (300, 6, 3.0, 5, -1.0), (600, 4, 1.5, 3, -2.0), (400, 8, 2.5, 4, -3.0),
          (200, 6, 4.0, 2, 0.0), (1000, 5, 2.0, 10, -1.5), (150, 7, 3.0, 6, -1.0), (500, 3, 2.0, 3, -1.0),
          (300, 6, 3.0, 25, -1.0)]


def simulate(seed: int, subjects: int, visits: int, sd: float, sites: int, b0: float, miss: float = 0.12):
    rng = np.random.default_rng(seed)
    n = subjects * visits
    who = np.repeat(np.arange(subjects), visits)
    t = np.tile(np.arange(visits, dtype=float), subjects)
    keep = rng.random(n) > miss
    b = rng.normal(0, sd, subjects)[who]
    trt = (rng.random(subjects) < 0.5).astype(int)[who]
    eta = b0 + b - 0.3 * t - 0.4 * trt * t
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
    df = pd.DataFrame({"id": [f"p{i:04d}" for i in who], "trt": trt, "time": t, "y": y, "site": who % sites})
    return {f"s{j}": part.drop(columns="site") for j, part in df[keep].groupby("site")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3,4,5,6")
    ap.add_argument("--iterative", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'subjects':>8} {'visits':>6} {'SD':>4} {'sites':>5} {'b0':>5}  hybrid rounds per seed"
          + ("  | iterative, largest difference" if args.iterative else ""))
    every = []
    for shape in SHAPES:
        rounds, its, diff = [], [], 0.0
        for seed in seeds:
            sites = simulate(seed, *shape)
            res = fedglmm.fit(FORMULA, sites, family="binomial")
            rounds.append(res.rounds)
            if args.iterative:
                it = fedglmm.fit(FORMULA, sites, family="binomial", method="iterative")
                its.append(it.rounds)
                diff = max(diff, float(np.max(np.abs(np.r_[res.fixef, res.theta] - np.r_[it.fixef, it.theta]))))
        every += rounds
        line = f"{shape[0]:8d} {shape[1]:6d} {shape[2]:4.1f} {shape[3]:5d} {shape[4]:5.1f}  {rounds}"
        print(line + (f"  | {its}, {diff:.1e}" if args.iterative else ""), flush=True)
    print(f"hybrid rounds: median {np.median(every):g}, max {max(every)}, > 4 in {sum(r > 4 for r in every)} of "
          f"{len(every)}")


if __name__ == "__main__":
    main()
