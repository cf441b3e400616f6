#!/usr/bin/env python3
"""Gaussian random intercepts and slopes over sites, many small groups: rounds of the default method.

usage: python3 benchmarks/gaussian_slope_rounds.py [--seeds 24] [--method hybrid] [--effects 3]

Each seed draws G ~ U{30..199} groups of 2-11 rows, S ~ U{2..8} sites (group g at site g mod S), x ~ N(0, 1),
t ~ U{0..4}, intercept SD ~ U(0.1, 2) and, for odd seeds, a slope SD ~ U(0.05, 0.8) on t, residual SD 1;
even seeds fit ``y ~ x + t + (1 | g)``, odd ones ``y ~ x + t + (1 + t | g)``, by REML and by ML.  Groups under
the sites' default minimum size keep their statistics at the site.  The table gives each fit's rounds, or
the first words of the error it ended with; the last line the median, largest and total rounds.  Draw 21
is tests/data/lmm_singular_slope.csv (an intercept SD near 0 beside the slope).

``--effects 3``: every draw fits ``y ~ x + t + (1 + t + x | g)`` instead (seed 1000 + draw): 40-149 groups of
3-11 rows over 2-6 sites, each of the three SDs ~ U(0, 1) and 0 with probability 0.3, independent effects.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm


def simulate(seed: int):
    rng = np.random.default_rng(seed)
    G, S = int(rng.integers(30, 200)), int(rng.integers(2, 9))
    g = np.repeat(np.arange(G), rng.integers(2, 12, G))
    x, t = rng.normal(size=g.size), rng.integers(0, 5, g.size).astype(float)
    slope = seed % 2 == 1
    sd0, sd1 = rng.uniform(0.1, 2.0), rng.uniform(0.05, 0.8)
    y = 1 + 0.5 * x - 0.2 * t + rng.normal(0, sd0, G)[g] + (rng.normal(0, sd1, G)[g] * t if slope else 0) \
        + rng.normal(size=g.size)
    df = pd.DataFrame({"y": y, "x": x, "t": t, "g": g})
    formula = "y ~ x + t + (1 + t | g)" if slope else "y ~ x + t + (1 | g)"
    return {f"s{k}": df[df.g % S == k].reset_index(drop=True) for k in range(S)}, formula, G, S


def simulate3(seed: int):
    rng = np.random.default_rng(1000 + seed)
    G, S = int(rng.integers(40, 150)), int(rng.integers(2, 7))
    g = np.repeat(np.arange(G), rng.integers(3, 12, G))
    x, t = rng.normal(size=g.size), rng.integers(0, 5, g.size).astype(float)
    b = rng.normal(size=(G, 3)) * (rng.uniform(0.0, 1.0, 3) * (rng.random(3) < 0.7))
    y = 1 + 0.5 * x - 0.2 * t + b[g, 0] + b[g, 1] * t + b[g, 2] * x + rng.normal(size=g.size)
    df = pd.DataFrame({"y": y, "x": x, "t": t, "g": g})
    return {f"s{k}": df[df.g % S == k].reset_index(drop=True) for k in range(S)}, "y ~ x + t + (1 + t + x | g)", G, S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--method", default="hybrid", choices=["hybrid", "iterative"])
    ap.add_argument("--effects", type=int, default=2, choices=[2, 3], help="3: (1 + t + x | g) in every draw")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for seed in range(args.seeds):
        data, formula, G, S = simulate3(seed) if args.effects == 3 else simulate(seed)
        row = {"seed": seed, "groups": G, "sites": S, "slope": "(1 + t" in formula}
        for reml in (True, False):
            try:
                row["reml" if reml else "ml"] = fedglmm.fit(formula, data, reml=reml, method=args.method).rounds
            except Exception as e:     # noqa: BLE001 -- a fit that fails is a row of the table
                row["reml" if reml else "ml"] = f"{type(e).__name__}: {str(e)[:40]}"
        rows.append(row)
    tab = pd.DataFrame(rows)
    print(tab.to_string(index=False))
    for col in ("reml", "ml"):
        ok = [r for r in tab[col] if not isinstance(r, str)]
        print(f"{col}: {len(tab) - len(ok)} failed; median {np.median(ok):g}, max {max(ok)}, total {sum(ok)}")


if __name__ == "__main__":
    main()
