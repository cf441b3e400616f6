#!/usr/bin/env python3
"""Rounds of the hybrid on binary longitudinal data where no site can fit anything: every patient a site.

usage: python3 benchmarks/binary_each_rounds.py [--seeds N] [--groups G] [--per-site K] [--iterative]

Simulated (numpy default_rng(seed)): G patients (default 150) × m visits, t = 0..m−1, treatment by patient
(half), η = a + 0.2·trt − 0.3·t − 0.2·trt·t + b, b ~ N(0, σ²), y ~ Bernoulli(expit(η)); a is set so that
about a share p of the rows are 1 at σ = 0.  Fitted as ``y ~ trt * t + (1 | g)`` (logit, Laplace), each
site holding K patients (default 1: a site of a patient's few rows sends no summary of its group and no
fit of its own, and the start is the site totals').  The grid: m in (4, 7), σ in (0.5, 1.5, 3, 5), p in
(0.1, 0.35).  Per fit: the hybrid's rounds, its fit seconds, its estimate of σ, and with ``--iterative``
the iterative method's rounds and the largest difference of the two fits (fixed effects, σ, logLik); the
last lines: median and largest hybrid rounds, and how many took more than 4.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import fedglmm


def simulate(seed: int, groups: int, m: int, sigma: float, prevalence: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), m)
    t = np.tile(np.arange(m, dtype=float), groups)
    trt = (g % 2).astype(float)
    a = np.log(prevalence / (1.0 - prevalence)) + 0.3 * (m - 1) / 2.0
    eta = a + 0.2 * trt - 0.3 * t - 0.2 * trt * t + rng.normal(0.0, sigma, groups)[g]
    y = (rng.random(len(g)) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "trt": trt, "t": t, "g": g})


def _vector(r) -> np.ndarray:
    return np.r_[r.fixef.to_numpy(), [x["sd"] for x in r.random], r.loglik]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--groups", type=int, default=150)
    ap.add_argument("--per-site", type=int, default=1)
    ap.add_argument("--iterative", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    formula = "y ~ trt * t + (1 | g)"
    print(f"{'seed':>4} {'m':>2} {'sigma':>5} {'p':>5} {'sites':>5} {'hybrid':>6} {'hyb_s':>6} {'sd_hat':>6}"
          + (f" {'iterative':>9} {'max_diff':>8}" if args.iterative else ""))
    rounds = []
    for seed in range(args.seeds):
        for m in (4, 7):
            for sigma in (0.5, 1.5, 3.0, 5.0):
                for p in (0.1, 0.35):
                    df = simulate(seed, args.groups, m, sigma, p)
                    site = df["g"] // args.per_site
                    data = {f"s{k}": part.reset_index(drop=True) for k, part in df.groupby(site)}
                    t0 = time.perf_counter()
                    r = fedglmm.fit(formula, data, family="binomial")
                    sec = time.perf_counter() - t0
                    rounds.append(r.rounds)
                    line = f"{seed:>4} {m:>2} {sigma:>5.1f} {p:>5.2f} {len(data):>5} {r.rounds:>6} {sec:>6.2f} " \
                           f"{r.random[0]['sd']:>6.3f}"
                    if args.iterative:
                        it = fedglmm.fit(formula, data, family="binomial", method="iterative")
                        diff = float(np.max(np.abs(_vector(r) - _vector(it)) / np.maximum(1.0, np.abs(_vector(it)))))
                        line += f" {it.rounds:>9} {diff:>8.1e}"
                    print(line, flush=True)
    rounds = np.asarray(rounds)
    print(f"hybrid rounds: median {np.median(rounds):g}, max {rounds.max()}, > 4 in {int(np.sum(rounds > 4))} of "
          f"{len(rounds)}; in all {int(rounds.sum())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
