#!/usr/bin/env python3
"""How many likelihood evaluations a site's own fit takes where it has many groups (the hybrid's one-shot
round: a site with 100 groups or more cuts its fit short, :func:`fedglmm.site.own_fit._cut_short`), for
several floors of its start's random-effect SDs (``fedglmm.site.own_fit.MANY_FLOOR``).

usage: python3 benchmarks/own_fit_evals.py [--seeds 1,2,3] [--floors 0.5,0.25,0.1] [--cases]

Each seed draws 24 sites: binomial or poisson (alternating); 100, 200, 500 or 1000 groups of about 5, 10,
30 or 100 rows (each group's size uniform on [size/2, 2 size)); x1 ~ N(0, 1), x2 ~ Bernoulli(0.4);
random-intercept SD 0, 0.3, 1 or 2 and, in three sites of four, a random slope on x1 with SD 0, 0.1 or
0.5 (uncorrelated).  Every evaluation is one pass of the Laplace kernel over the site's rows (value,
gradient and Hessian).  The table gives, per floor, the evaluations summed over the sites, the steps the
trust region rejected, and against the first floor the sites that took more and fewer evaluations.
``--cases`` also prints each site's evaluations.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm.site.own_fit as own_fit
from fedglmm.likelihood.newton import TrustRegionNewton
from fedglmm.site.summaries import summarize


def draw(rng, i: int):
    family = ("binomial", "poisson")[i % 2]
    G, size = int(rng.choice([100, 200, 500, 1000])), int(rng.choice([5, 10, 30, 100]))
    sd0, sd1, slope = (0.0, 0.3, 1.0, 2.0)[i // 2 % 4], (0.0, 0.1, 0.5)[i % 3], i % 4 != 3
    g = np.repeat(np.arange(G), rng.integers(max(2, size // 2), size * 2, G))
    n = g.size
    x1, x2 = rng.normal(size=n), rng.binomial(1, 0.4, n)
    eta = (-1.5 if family == "binomial" else 0.3) + 0.5 * x1 - 0.4 * x2 + rng.normal(0, sd0, G)[g] \
        + (rng.normal(0, sd1, G)[g] * x1 if slope else 0.0)
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
    formula = "y ~ x1 + x2 + " + ("(1 + x1 | g)" if slope else "(1 | g)")
    label = f"{family} {'slope' if slope else 'intercept'} G={G} size~{size} SDs {sd0:g}/{sd1 if slope else 0:g}"
    return label, family, formula, pd.DataFrame({"y": y, "x1": x1, "x2": x2, "g": g})


class Counter:
    """Counts the points the trust region is told about (each one kernel evaluation) and its rejections."""

    def __init__(self):
        self.evals = self.rejected = 0
        self._tell = TrustRegionNewton.tell
        counter = self

        def tell(opt, xs, results):
            counter.evals += len(xs)
            out = counter._tell(opt, xs, results)
            counter.rejected += opt.accepted is None
            return out

        TrustRegionNewton.tell = tell

    def reset(self):
        self.evals = self.rejected = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--floors", default="0.5,0.25,0.1")
    ap.add_argument("--cases", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    floors = [float(f) for f in args.floors.split(",")]
    sites = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rng = np.random.default_rng(seed)
        sites += [draw(rng, i) for i in range(24)]
    count = Counter()
    table = {}
    default = own_fit.MANY_FLOOR
    for floor in floors:
        own_fit.MANY_FLOOR = floor
        rows = []
        for label, family, formula, df in sites:
            count.reset()
            summarize(df, formula, family, None, "site", local={"nagq": 1, "curvature": "observed", "sites": 10},
                      kept={})
            rows.append((count.evals, count.rejected))
        table[floor] = rows
    own_fit.MANY_FLOOR = default
    base = [e for e, _ in table[floors[0]]]
    print(f"{len(sites)} simulated sites (seeds {args.seeds}); the package's floor is {default:g}\n")
    print(f"| floor | evaluations | rejected steps | sites with more than at {floors[0]:g} | with fewer | most more |")
    print("|---|---|---|---|---|---|")
    for floor in floors:
        ev = [e for e, _ in table[floor]]
        diff = [b - a for a, b in zip(base, ev)]
        print(f"| {floor:g} | {sum(ev)} | {sum(r for _, r in table[floor])} | {sum(d > 0 for d in diff)} | "
              f"{sum(d < 0 for d in diff)} | {max(diff)} |")
    if args.cases:
        print()
        print("| site | " + " | ".join(f"floor {f:g}" for f in floors) + " |")
        print("|---" * (len(floors) + 1) + "|")
        for j, (label, *_rest) in enumerate(sites):
            print(f"| {label} | " + " | ".join(str(table[f][j][0]) for f in floors) + " |")


if __name__ == "__main__":
    main()
