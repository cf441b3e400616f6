#!/usr/bin/env python3
"""Many sites with few groups each, counts and 0/1 outcomes beside real covariates: the hybrid's rounds with
the sites' own fits in its start and without them, against the iterative fit.

usage: python3 benchmarks/many_sites_counts.py [--draws 0:40] [--family poisson|binomial|both]

Each draw (seeded by its number): 21, 30 or 50 sites; 250-1500 groups of 10-59 rows dealt to sites by label
(g mod sites), so 5-70 groups a site; x1, x2, x3 ~ N(0, 1) with slopes 0.5, −0.3, 0.2; a random intercept
of SD 0.3-1.5 and, in 4 draws of 10, a random slope of x1 (SD 0.4); poisson (intercept 0.3) or binomial
(intercept −1).  Default site rules.  Columns: the hybrid's rounds (``own``: as the sites do; ``0/1 rule``:
with the rule of a 0/1 outcome for every family -- beyond MANY_SITES (20) sites, a site of fewer than
SKIP_OWN_GROUPS (50) groups, all summarised, sends no fit of its own), the iterative method's rounds,
and the largest difference of the default fit's fixed effects, SDs and logLik from the iterative fit's.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.model.families import get_family
from fedglmm.site import summaries


BINARY = get_family("binomial")


def draw(seed: int, family: str):
    rng = np.random.default_rng([seed, 2026])
    G, S = int(rng.choice([250, 400, 800, 1500])), int(rng.choice([21, 30, 50]))
    slope = bool(rng.random() < 0.4)
    m = rng.integers(10, 60, G)
    g = np.repeat(np.arange(G), m)
    X = rng.normal(size=(g.size, 3))
    sd = rng.uniform(0.3, 1.5)
    b0, b1 = rng.normal(0, sd, G), (rng.normal(0, 0.4, G) if slope else np.zeros(G))
    eta = (-1.0 if family == "binomial" else 0.3) + X @ np.array([0.5, -0.3, 0.2]) + b0[g] + b1[g] * X[:, 0]
    y = rng.random(g.size) < 1 / (1 + np.exp(-eta)) if family == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y.astype(float), "x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2], "g": g})
    formula = "y ~ x1 + x2 + x3 + " + ("(1 + x1 | g)" if slope else "(1 | g)")
    return formula, {f"s{i:02d}": df[g % S == i].reset_index(drop=True) for i in range(S)}, (G, S, slope)


def _vector(res) -> np.ndarray:
    return np.r_[res.fixef.to_numpy(), [r.get("sd", r.get("corr")) for r in res.random], res.loglik]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", default="0:40")
    ap.add_argument("--family", default="both", choices=("poisson", "binomial", "both"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    lo, hi = map(int, args.draws.split(":"))
    families = ("poisson", "binomial") if args.family == "both" else (args.family,)
    wanted = summaries._own_wanted
    print(f"{'family':9s} {'draw':>4s} {'groups':>6s} {'sites':>5s} {'slope':>5s} {'own':>4s} {'0/1 rule':>8s} "
          f"{'iter':>4s} {'diff':>8s} {'sec':>5s}")
    for family in families:
        own_r, none_r, above = [], [], [0, 0]
        worst = 0.0
        for seed in range(lo, hi):
            formula, data, (G, S, slope) = draw(seed, family)
            t0 = time.perf_counter()
            res = fedglmm.fit(formula, data, family=family)
            sec = time.perf_counter() - t0
            summaries._own_wanted = lambda local, keep, fam: wanted(local, keep, BINARY)
            try:
                bare = fedglmm.fit(formula, data, family=family)
            finally:
                summaries._own_wanted = wanted
            it = fedglmm.fit(formula, data, family=family, method="iterative")
            diff = float(np.max(np.abs(_vector(res) - _vector(it)) / np.maximum(1.0, np.abs(_vector(it)))))
            worst = max(worst, diff)
            own_r.append(res.rounds)
            none_r.append(bare.rounds)
            above[0] += res.rounds > 4
            above[1] += bare.rounds > 4
            print(f"{family:9s} {seed:4d} {G:6d} {S:5d} {str(slope):>5s} {res.rounds:4d} {bare.rounds:8d} "
                  f"{it.rounds:4d} {diff:8.1e} {sec:5.2f}", flush=True)
        print(f"{family}: rounds with the sites' fits {sum(own_r)} (median {np.median(own_r):g}, max {max(own_r)}, "
              f"> 4 in {above[0]} of {len(own_r)}); without {sum(none_r)} (median {np.median(none_r):g}, max "
              f"{max(none_r)}, > 4 in {above[1]}); largest difference from the iterative fit {worst:.1e}")


if __name__ == "__main__":
    main()
