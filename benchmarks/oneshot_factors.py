#!/usr/bin/env python3
"""One-shot fits (moments of order 2) of GLMMs with a factor, against the pooled (iterative) fit.

usage: python3 benchmarks/oneshot_factors.py [--seeds 0:30] [--families binomial,poisson]

Simulated data (numpy default_rng(seed)): G = 20-79 groups of m = 15-59 rows over 2-5 sites (groups dealt
round-robin), a factor f of L = 3-5 levels drawn per row with effects N(0, 0.7²), a group-level 0/1 column
z, a random intercept N(0, 0.8²) and, for odd seeds, a real covariate x ~ N(0, 1) beside them; a logistic
or a poisson outcome.  Even seeds fit ``y ~ z + factor(f) + (1 | g)`` -- factors and group-level columns
alone, whose likelihood the order-2 moments carry (the one-shot fit is then the pooled fit) -- odd seeds
``y ~ x + z + factor(f) + (1 | g)``.  Per fit: the one-shot fit's largest distance to the pooled fit over
the fixed effects in its standard errors (``--moments 2 --min-group 1``, every group summarised) and the
hybrid's rounds; the last lines give the medians by model.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm


def simulate(seed: int, family: str) -> tuple[str, dict]:
    rng = np.random.default_rng(seed)
    G, m, L = int(rng.integers(20, 80)), int(rng.integers(15, 60)), int(rng.integers(3, 6))
    g = np.repeat(np.arange(G), m)
    f = rng.integers(0, L, G * m)
    x = rng.normal(size=G * m)
    z = rng.binomial(1, 0.5, G)[g]
    eff = rng.normal(0, 0.7, L)
    eff[0] = 0.0
    eta = rng.normal(-0.5, 0.5) + eff[f] + 0.5 * x + 0.4 * z + rng.normal(0, 0.8, G)[g]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y, "x": x, "z": z, "f": f, "g": g})
    k = int(rng.integers(2, 6))
    formula = "y ~ x + z + factor(f) + (1 | g)" if seed % 2 else "y ~ z + factor(f) + (1 | g)"
    return formula, {f"s{i}": df[df.g % k == i].reset_index(drop=True) for i in range(k)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0:30")
    ap.add_argument("--families", default="binomial,poisson")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    lo, hi = (int(v) for v in args.seeds.split(":"))
    rows = []
    for family in args.families.split(","):
        for seed in range(lo, hi):
            formula, data = simulate(seed, family)
            exact = fedglmm.fit(formula, data, family=family, method="iterative")
            one = fedglmm.fit(formula, data, family=family, method="oneshot", moments=2, min_group=1)
            hybrid = fedglmm.fit(formula, data, family=family)
            dist = float(np.max(np.abs(one.fixef.to_numpy() - exact.fixef.to_numpy()) / exact.se.to_numpy()))
            rows.append({"family": family, "seed": seed, "model": "x + factor" if seed % 2 else "factor",
                         "sites": len(data), "oneshot_SE": dist, "hybrid": hybrid.rounds,
                         "iterative": exact.rounds})
            print(rows[-1], flush=True)
    tab = pd.DataFrame(rows)
    print(tab.to_string(index=False, float_format=lambda v: f"{v:.2g}"))
    for (family, model), part in tab.groupby(["family", "model"]):
        print(f"{family}, {model}: one-shot distance median {part.oneshot_SE.median():.2g} SE, max "
              f"{part.oneshot_SE.max():.2g}; hybrid rounds {part.hybrid.sum()} in all, max {part.hybrid.max()}")


if __name__ == "__main__":
    main()
