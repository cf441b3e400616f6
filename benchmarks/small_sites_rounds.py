#!/usr/bin/env python3
"""Rounds of the hybrid over sites that hold few groups each: poisson, negative binomial and Gamma (log).

usage: python3 benchmarks/small_sites_rounds.py [--seeds N] [--families poisson,negative_binomial,gamma]

Simulated longitudinal counts and positive outcomes (numpy default_rng(seed)): K sites × G groups × m rows,
t = 0..m−1 within a group, x ~ N(0, 1), η = 1 + 0.1 t + 0.3 x + b0 + b1·t with b0 ~ N(0, 0.5²) and, in the
shapes with a slope, b1 ~ N(0, 0.2²) (fitted as ``(t | g)``, else ``(1 | g)``); poisson counts with a gamma
(shape 2) multiplier per row (overdispersed, fitted as poisson), negative binomial ϑ = 2, Gamma shape 4.
Site k holds groups kG..(k+1)G−1.  Shapes (K, G, m, slope): (3, 6, 10, yes), (3, 10, 5, no), (5, 4, 8, yes),
(10, 3, 6, no), (4, 25, 4, yes), (3, 40, 10, yes).  Per fit: the hybrid's and the iterative method's
rounds and the difference of their logLiks; the last lines: median and largest hybrid rounds per family.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm

SHAPES = [(3, 6, 10, True), (3, 10, 5, False), (5, 4, 8, True), (10, 3, 6, False), (4, 25, 4, True),
          (3, 40, 10, True)]


def simulate(seed: int, family: str, nsites: int, per_site: int, size: int, slope: bool) -> dict:
    rng = np.random.default_rng(seed)
    G = nsites * per_site
    g = np.repeat(np.arange(G), size)
    t = np.tile(np.arange(size, dtype=float), G)
    x = rng.normal(size=G * size)
    b0 = rng.normal(0, 0.5, G)[g]
    b1 = rng.normal(0, 0.2, G)[g] if slope else 0.0
    mu = np.exp(1.0 + 0.1 * t + 0.3 * x + b0 + b1 * t)
    if family == "gamma":
        y = rng.gamma(4.0, mu / 4.0)
    elif family == "poisson":
        y = rng.poisson(mu * rng.gamma(2.0, 0.5, len(mu)))
    else:
        y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu))
    df = pd.DataFrame({"y": y, "t": t, "x": x, "g": g})
    return {f"s{i}": df[g // per_site == i].reset_index(drop=True) for i in range(nsites)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", default="poisson,negative_binomial,gamma")
    args = ap.parse_args()
    rows = []
    for fam in args.families.split(","):
        for nsites, per_site, size, slope in SHAPES:
            for seed in range(args.seeds):
                data = simulate(seed, fam, nsites, per_site, size, slope)
                formula = "y ~ t + x + (t | g)" if slope else "y ~ t + x + (1 | g)"
                kw = {"link": "log"} if fam == "gamma" else {}
                row = {"family": fam, "sites": nsites, "groups/site": per_site, "rows/group": size,
                       "slope": slope, "seed": seed}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        hyb = fedglmm.fit(formula, data, family=fam, **kw)
                        it = fedglmm.fit(formula, data, family=fam, method="iterative", **kw)
                        row.update(hybrid=hyb.rounds, iterative=it.rounds, dloglik=f"{hyb.loglik - it.loglik:+.1e}")
                    except fedglmm.FedGLMMError as exc:
                        row.update(hybrid=None, iterative=None, dloglik=str(exc)[:60])
                rows.append(row)
                print(row, flush=True)
    tab = pd.DataFrame(rows)
    print(tab.to_string(index=False))
    for fam, part in tab.groupby("family", sort=False):
        r = part["hybrid"].dropna().astype(int)
        print(f"{fam}: hybrid rounds median {np.median(r):g}, max {r.max()}, > 4 in {int((r > 4).sum())} of {len(r)}; "
              f"iterative median {np.median(part['iterative'].dropna()):g}; failures {int(part['hybrid'].isna().sum())}")


if __name__ == "__main__":
    main()
