#!/usr/bin/env python3
"""A random slope beside an intercept whose SD is (nearly) 0: rounds of both methods.

usage: python3 benchmarks/singular_slope_rounds.py [--seeds 12] [--sites 2] [--family binomial] [--crossed H]

Each seed simulates 45 groups of 2-59 rows, x1 ~ N(0, 1), x2 ~ Bernoulli(0.4), a random slope on x1 with
SD 0.5 and no random intercept, and fits ``y ~ x1 + x2 + (1 + x1 | g)`` over the given number of sites
(groups dealt by label); ``--crossed H`` adds a crossed factor h of H levels (random intercept SD 0.4,
fitted as ``+ (1 | h)``, its levels at every site: the shared-level engine).  Such a fit's intercept SD goes to (nearly) 0, where lme4's θ is barely
identified: the table gives each method's rounds, the largest difference of their logLiks and of their
random-effect covariances (Σ, not θ), and Λ₁₁ and the correlation of the hybrid's fit.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm


def simulate(seed: int, family: str, sites: int, crossed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(45), rng.integers(2, 60, 45))
    x1, x2 = rng.normal(size=g.size), rng.binomial(1, 0.4, g.size)
    eta = (-1.0 if family == "binomial" else 0.5) + 0.5 * x1 - 0.4 * x2 + rng.normal(0, 0.5, 45)[g] * x1
    h = np.zeros(g.size, int)
    if crossed:
        h = np.random.default_rng([seed, 1]).integers(0, crossed, g.size)
        eta = eta + np.random.default_rng([seed, 2]).normal(0, 0.4, crossed)[h]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if family == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y, "x1": x1, "x2": x2, "g": g, "h": h})
    return {f"s{j}": df[df.g % sites == j] for j in range(sites)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--family", default="binomial", choices=["binomial", "poisson"])
    ap.add_argument("--crossed", type=int, default=0, help="levels of a crossed random intercept (0: none)")
    args = ap.parse_args()
    formula = "y ~ x1 + x2 + (1 + x1 | g)" + (" + (1 | h)" if args.crossed else "")
    warnings.simplefilter("ignore")
    rows = []
    for seed in range(args.seeds):
        data = simulate(seed, args.family, args.sites, args.crossed)
        res = {}
        for method in ("hybrid", "iterative"):
            try:
                res[method] = fedglmm.fit(formula, data, family=args.family, method=method)
            except fedglmm.FedGLMMError as e:
                res[method] = str(e).splitlines()[0][:40]
        h, i = res["hybrid"], res["iterative"]
        ok = not isinstance(h, str) and not isinstance(i, str)
        sig = (max(np.max(np.abs(h.covariances()[f].to_numpy() - i.covariances()[f].to_numpy()))
                   for f in h.covariances()) if ok else np.nan)
        cov = h.covariances()["g"].to_numpy() if not isinstance(h, str) else None
        rows.append({"seed": seed, "hybrid": h if isinstance(h, str) else h.rounds,
                     "iterative": i if isinstance(i, str) else i.rounds,
                     "d_loglik": f"{abs(h.loglik - i.loglik):.1e}" if ok else "",
                     "d_sigma": f"{sig:.1e}" if ok else "",
                     "lambda11": "" if cov is None else f"{np.asarray(h.theta)[0]:.1e}",
                     "corr": "" if cov is None else f"{cov[0, 1] / np.sqrt(max(cov[0, 0] * cov[1, 1], 1e-300)):+.3f}"})
    tab = pd.DataFrame(rows)
    print(tab.to_string(index=False))
    num = tab[[not isinstance(a, str) and not isinstance(b, str) for a, b in zip(tab.hybrid, tab.iterative)]]
    print(f"failures: hybrid {sum(isinstance(r, str) for r in tab.hybrid)}, iterative "
          f"{sum(isinstance(r, str) for r in tab.iterative)} of {len(tab)}; hybrid rounds median "
          f"{np.median(num.hybrid.astype(int)):g}, max {num.hybrid.astype(int).max()}; iterative median "
          f"{np.median(num.iterative.astype(int)):g}, max {num.iterative.astype(int).max()}")


if __name__ == "__main__":
    main()
