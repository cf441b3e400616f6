#!/usr/bin/env python3
"""Rounds of gaussian fits with two grouping factors (visits of patients in hospitals) on fresh data, split
one hospital per site and over 3 sites, and how far each split fit is from the pooled one.

usage: python3 benchmarks/gaussian_sites_rounds.py [--seeds 100-124]

Each draw: 6, 12, 30 or 60 hospitals (by seed), 5-30 patients each, 1-6 visits per patient;
y = 1 + 0.5 t + 0.3 x + b_hospital + b_patient (+ b_slope t every third seed) + e, SDs 0.7, 1.0 (0.3) and
1.2; REML on even seeds, ML on odd ones.  Model ``y ~ t + x + (1 | patient) + (1 | hospital)``, or
``(1 + t | patient)`` with the slope.  The table gives the rounds of each split and the largest difference
from the pooled fit (relative for the fixed effects and logLik, absolute for SDs and correlations); the last
lines the median and largest rounds and how many took more than 4.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import fedglmm


def draw(seed: int) -> tuple[pd.DataFrame, str, bool]:
    rng = np.random.default_rng(seed)
    H, slope, reml = (6, 12, 30, 60)[seed % 4], seed % 3 == 0, seed % 2 == 0
    parts = []
    for h in range(H):
        bh = rng.normal(0, 0.7)
        for p in range(int(rng.integers(5, 30))):
            b0, b1 = rng.normal(0, 1.0), rng.normal(0, 0.3) if slope else 0.0
            nv = int(rng.integers(1, 7))
            t, x = np.arange(nv, dtype=float), rng.normal(size=nv)
            y = 1 + 0.5 * t + 0.3 * x + bh + b0 + b1 * t + rng.normal(0, 1.2, nv)
            parts.append(pd.DataFrame({"y": y, "t": t, "x": x, "patient": f"h{h}p{p}", "hospital": f"h{h}"}))
    formula = "y ~ t + x + " + ("(1 + t | patient)" if slope else "(1 | patient)") + " + (1 | hospital)"
    return pd.concat(parts, ignore_index=True), formula, reml


def gap(a, b) -> float:
    fixed = np.max(np.abs(a.fixef - b.fixef) / np.maximum(1.0, np.abs(b.fixef)))
    vc = max(abs(x.get("sd", x.get("corr")) - y.get("sd", y.get("corr"))) for x, y in zip(a.random, b.random))
    return float(max(fixed, vc, abs(a.loglik - b.loglik) / abs(b.loglik)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="100-124", help="a range lo-hi (hi excluded) or a comma list")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    seeds = range(*map(int, args.seeds.split("-"))) if "-" in args.seeds else [int(s) for s in args.seeds.split(",")]
    rounds: dict[str, list[int]] = {}
    print(f"{'seed':>4s} {'hospitals':>9s} {'slope':>5s} {'REML':>5s} {'split':>15s} {'rounds':>6s} {'vs pooled':>9s} {'sec':>6s}")
    for seed in seeds:
        df, formula, reml = draw(seed)
        pooled = fedglmm.fit(formula, df, reml=reml)
        codes = df.hospital.str[1:].astype(int)
        splits = {"one per site": {h: g.reset_index(drop=True) for h, g in df.groupby("hospital")},
                  "3 sites": {f"s{k}": df[codes % 3 == k].reset_index(drop=True) for k in range(3)}}
        for label, sites in splits.items():
            t0 = time.perf_counter()
            res = fedglmm.fit(formula, sites, reml=reml)
            sec = time.perf_counter() - t0
            rounds.setdefault(label, []).append(res.rounds)
            print(f"{seed:4d} {df.hospital.nunique():9d} {str('+ t |' in formula):>5s} "
                  f"{str(reml):>5s} {label:>15s} {res.rounds:6d} {gap(res, pooled):9.1e} {sec:6.2f}", flush=True)
    for label, r in rounds.items():
        print(f"{label}: rounds median {np.median(r):g}, max {max(r)}, above 4 in {sum(x > 4 for x in r)} of {len(r)}")


if __name__ == "__main__":
    main()
