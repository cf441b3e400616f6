#!/usr/bin/env python3
"""A random slope whose SD is 0 or small beside a random intercept: rounds of both methods.

usage: python3 benchmarks/small_slope_rounds.py [--seeds 0:40]

Each seed s draws (numpy default_rng(500 + s)): binomial (even s) or poisson (odd s); 30-149 groups of 3,
5, 8, 15 or 25 rows dealt to 2-6 sites by label; x ~ N(0, 1), z ~ Bernoulli(0.4); a random intercept of SD
0.3, 0.8 or 1.5 and a random slope on x of SD 0, 0, 0.05 or 0.15 -- a slope a user adds that the data
barely carry, whose fitted SD is 0 or close to it.  Fitted as ``y ~ x + z + (1 + x | g)`` by the hybrid and
the iterative method.  Per fit: the shape, each method's rounds and the largest difference between them
(fixed effects, θ, logLik); the last line: the hybrid's rounds in all, median, max and above 4.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm

FORMULA = "y ~ x + z + (1 + x | g)"


def simulate(seed: int) -> tuple[str, dict, dict]:
    """(family, the sites' data, the shape) of fit ``seed``."""
    rng = np.random.default_rng(500 + seed)
    fam = ["binomial", "poisson"][seed % 2]
    G, m, S = int(rng.integers(30, 150)), int(rng.choice([3, 5, 8, 15, 25])), int(rng.integers(2, 7))
    slope_sd, sd = float(rng.choice([0.0, 0.0, 0.05, 0.15])), float(rng.choice([0.3, 0.8, 1.5]))
    g = np.repeat(np.arange(G), m)
    x, z = rng.normal(size=g.size), rng.binomial(1, 0.4, g.size)
    eta = (-0.5 if fam == "binomial" else 0.5) + 0.4 * x - 0.3 * z + rng.normal(0, sd, G)[g] \
        + rng.normal(0, slope_sd, G)[g] * x
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if fam == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y, "x": x, "z": z, "g": g, "site": g % S})
    sites = {f"s{k}": part.drop(columns="site").reset_index(drop=True) for k, part in df.groupby("site")}
    return fam, sites, {"groups": G, "rows/group": m, "sites": S, "slope_sd": slope_sd, "sd": sd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0:40", help="first:last (exclusive)")
    args = ap.parse_args()
    first, last = (int(v) for v in args.seeds.split(":"))
    warnings.simplefilter("ignore")
    rows = []
    for seed in range(first, last):
        fam, sites, shape = simulate(seed)
        h, it = (fedglmm.fit(FORMULA, sites, family=fam, method=m) for m in ("hybrid", "iterative"))
        diff = max(float(np.max(np.abs(h.fixef.to_numpy() - it.fixef.to_numpy()))),
                   float(np.max(np.abs(np.asarray(h.theta) - np.asarray(it.theta)))), abs(h.loglik - it.loglik))
        slope = np.sqrt(h.covariances()["g"].to_numpy()[1, 1])
        rows.append({"seed": seed, "family": fam, **shape, "hybrid": h.rounds, "iterative": it.rounds,
                     "max_diff": f"{diff:.1e}", "slope_SD_fit": f"{slope:.3f}"})
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    hyb = np.array([r["hybrid"] for r in rows])
    print(f"hybrid rounds: {hyb.sum()} in all, median {np.median(hyb):g}, max {hyb.max()}, above 4 in "
          f"{int(np.sum(hyb > 4))} of {len(hyb)}; iterative {sum(r['iterative'] for r in rows)} in all; largest "
          f"difference {max(float(r['max_diff']) for r in rows):.1e}")


if __name__ == "__main__":
    main()
