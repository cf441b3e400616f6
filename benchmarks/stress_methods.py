#!/usr/bin/env python3
"""Random GLMMs fitted by the iterative and hybrid methods: do both converge, to the same fit, in how many
rounds?

usage: python3 benchmarks/stress_methods.py [--fits 40] [--seed 7]

Each fit draws: 8-80 groups of 2-60 rows; binomial or poisson (alternating); covariates x1 ~ N(0, 1),
x2 ~ Bernoulli(0.4), x3 ~ U(-1, 2) (times 100 every third fit: a badly scaled column); random-intercept
SD 0, 0.3, 1 or 2.5 (cycling); every fifth fit a random slope on x1 (SD 0.5, correlated); 1-5 sites,
groups dealt to sites by label.  The table gives each method's rounds (or its error), the largest
difference between the two fits over fixed effects, θ and logLik, and the hybrid's time; the last lines
count failures and cases where the hybrid took more rounds.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import fedglmm


def draw(rng, i):
    G = int(rng.integers(8, 80))
    g = np.repeat(np.arange(G), rng.integers(2, 60, G))
    n = g.size
    family = ("binomial", "poisson")[i % 2]
    wide = i % 3 == 0
    x1, x2 = rng.normal(size=n), rng.binomial(1, 0.4, n)
    x3 = rng.uniform(-1, 2, n) * (100 if wide else 1)
    slope = i % 5 == 0
    b0 = rng.normal(0, (0.0, 0.3, 1.0, 2.5)[i % 4], G)
    b1 = rng.normal(0, 0.5, G) if slope else np.zeros(G)
    eta = (-1.0 if family == "binomial" else 0.5) + 0.5 * x1 - 0.4 * x2 + 0.2 * x3 / (100 if wide else 1) \
        + b0[g] + b1[g] * x1
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y, "x1": x1, "x2": x2, "x3": x3, "g": g})
    k = int(rng.integers(1, 6))
    formula = "y ~ x1 + x2 + x3 + " + ("(1 + x1 | g)" if slope else "(1 | g)")
    return formula, family, {f"s{j}": df[df.g % k == j] for j in range(k)}, G, n, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fits", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(args.seed)
    rows = []
    for i in range(args.fits):
        formula, family, data, G, n, k = draw(rng, i)
        res = {}
        for method in ("iterative", "hybrid"):
            t0 = time.perf_counter()
            try:
                res[method] = (fedglmm.fit(formula, data, family=family, method=method), time.perf_counter() - t0)
            except fedglmm.FedGLMMError as e:
                res[method] = (str(e).splitlines()[0][:40], None)
        a, b = res["iterative"][0], res["hybrid"][0]
        both = not isinstance(a, str) and not isinstance(b, str)
        diff = max(np.max(np.abs(a.fixef - b.fixef)), np.max(np.abs(np.asarray(a.theta) - np.asarray(b.theta))),
                   abs(a.loglik - b.loglik)) if both else np.nan
        rows.append({"fit": i, "family": family, "groups": G, "rows": n, "sites": k,
                     "slope": "(1 + x1" in formula, "it_rounds": a if isinstance(a, str) else a.rounds,
                     "hyb_rounds": b if isinstance(b, str) else b.rounds, "max_diff": f"{diff:.1e}",
                     "hyb_s": "" if res["hybrid"][1] is None else f"{res['hybrid'][1]:.2f}"})
    tab = pd.DataFrame(rows)
    print(tab.to_string(index=False))
    failed_it = sum(isinstance(r, str) for r in tab.it_rounds)
    failed_hy = sum(isinstance(r, str) for r in tab.hyb_rounds)
    num = tab[[not isinstance(a, str) and not isinstance(b, str) for a, b in zip(tab.it_rounds, tab.hyb_rounds)]]
    print(f"failures: iterative {failed_it}, hybrid {failed_hy} of {len(tab)}; "
          f"hybrid rounds median {int(np.median(num.hyb_rounds.astype(int)))}, max {num.hyb_rounds.astype(int).max()} "
          f"(iterative median {int(np.median(num.it_rounds.astype(int)))}, max {num.it_rounds.astype(int).max()}); "
          f"hybrid took more rounds in "
          f"{int((num.hyb_rounds.astype(int) > num.it_rounds.astype(int)).sum())}; largest difference "
          f"{num.max_diff.astype(float).max():.1e}")


if __name__ == "__main__":
    main()
