#!/usr/bin/env python3
"""Random GLMMs whose grouping factor has every level at every site (the rows dealt to sites at random),
fitted split by the hybrid (default) and iterative methods and pooled: rounds, and each split fit against
the pooled one.

usage: python3 benchmarks/stress_shared.py [--fits 60] [--seed 0] [--wide | --crossed]

Fit ``i`` draws, from ``numpy.random.default_rng(seed + i)``: 200, 600 or 1500 rows; 8, 30 or 80 levels;
2, 3 or 5 sites; a random-intercept SD of 0.3, 0.8 or 1.5; an intercept of -2, 0 or 1 (binary outcomes
down to a few per cent, counts up to several hundred); binomial or poisson; and one of the formulas
``y ~ x + (1|g)``, ``y ~ 0 + x + (1|g)`` (the random effects carry the mean), ``y ~ x + (x|g)``,
``y ~ x + (1|g) + (0 + x|g)``; ``--wide`` and ``--crossed`` draw others (:func:`draw_wide`,
:func:`draw_crossed`: two grouping factors, one of them shared).  Levels shared by sites are fitted with the
Laplace approximation, the shared effects v solved by the coordinator (README, "Levels shared by sites").

Printed per fit: the draw, the pooled fit's rounds, and for each method its rounds, its logLik minus the
pooled one, the largest absolute difference of its fixed effects from the pooled ones and the largest relative
difference of its standard errors (not a criterion: see README, "Levels shared by sites"); ``BAD`` where
either method is more than 1e-8 off in logLik or 1e-6 in a fixed effect, ``ERR`` and the message where a
fit stopped.  Last, the totals: rounds in all and the median and largest, per method, and the largest
differences.  On 60 fits this takes about 3 minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
import pandas as pd

import fedglmm

FORMULAS = ("y ~ x + (1|g)", "y ~ 0 + x + (1|g)", "y ~ x + (x|g)", "y ~ x + (1|g) + (0 + x|g)")


def draw(seed: int):
    """One random data set: (family, formula, rows, levels, sites, SD, intercept, pooled frame, sites)."""
    rng = np.random.default_rng(seed)
    n, G, K = int(rng.choice([200, 600, 1500])), int(rng.choice([8, 30, 80])), int(rng.choice([2, 3, 5]))
    g, x = rng.integers(0, G, n), rng.normal(size=n)
    sd = float(rng.choice([0.3, 0.8, 1.5]))
    b = rng.normal(0, sd, G)
    mu = float(rng.choice([-2.0, 0.0, 1.0]))
    fam = str(rng.choice(["binomial", "poisson"]))
    eta = mu + 0.5 * x + b[g]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if fam == "binomial" else rng.poisson(np.exp(eta))
    df = pd.DataFrame({"y": y, "x": x, "g": [f"h{k}" for k in g]})
    site = rng.integers(0, K, n)
    sites = {f"s{k}": df[site == k].reset_index(drop=True) for k in range(K)}
    return fam, str(rng.choice(FORMULAS)), n, G, K, sd, mu, df, sites


def draw_wide(seed: int):
    """``--wide``: more levels, rarer events, larger SDs and a binary covariate.  From
    ``default_rng(1000 + seed)``: 20, 60 or 200 levels; 800 or 3000 rows; 3 or 6 sites; binomial (intercept -4,
    -1 or 1.5) or poisson (-2, 0.5 or 2; the linear predictor capped at 8); an SD of 0.5, 1.5 or 2.5;
    ``y ~ x + z + (1 | g)``, z ~ Bernoulli(0.4) with effect -0.3, x's 0.4."""
    rng = np.random.default_rng(1000 + seed)
    G, n, K = int(rng.choice([20, 60, 200])), int(rng.choice([800, 3000])), int(rng.choice([3, 6]))
    fam, sd = str(rng.choice(["binomial", "poisson"])), float(rng.choice([0.5, 1.5, 2.5]))
    mu = float(rng.choice([-4.0, -1.0, 1.5])) if fam == "binomial" else float(rng.choice([-2.0, 0.5, 2.0]))
    g, x, z = rng.integers(0, G, n), rng.normal(size=n), rng.binomial(1, 0.4, n)
    eta = mu + 0.4 * x - 0.3 * z + rng.normal(0, sd, G)[g]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if fam == "binomial" else rng.poisson(np.exp(np.minimum(eta, 8)))
    df = pd.DataFrame({"y": y, "x": x, "z": z, "g": [f"l{k}" for k in g]})
    site = rng.integers(0, K, n)
    sites = {f"s{k}": df[site == k].reset_index(drop=True) for k in range(K)}
    return fam, "y ~ x + z + (1 | g)", n, G, K, sd, mu, df, sites


def draw_crossed(seed: int):
    """``--crossed``: two grouping factors, subjects local to one site each and items shared by the sites
    (every row's item drawn at random).  From ``default_rng(2000 + seed)``: 2, 4 or 8 sites of 10, 30 or 80
    subjects each; 2-5, 4-12 or 8-25 rows a subject; 8, 25 or 60 items; SDs of subject and item 0.3, 0.8 or 1.5
    each; binomial (intercept -3, -1 or 0.5) or poisson (-1, 0.5 or 1.5, the linear predictor capped at 8);
    ``y ~ x + (1 | id) + (1 | item)``, ``y ~ x + z + (1 | id) + (1 | item)`` (z a subject's Bernoulli(0.5)
    covariate, effect -0.4) or ``y ~ x + (1 | id) + (1 + x | item)`` (slope SD 0.4), x's effect 0.5.  Printed
    as ``levels`` and ``sd``: the items' number and SD.  60 fits take about 9 minutes on a 2-core machine."""
    rng = np.random.default_rng(2000 + seed)
    K, per, I = int(rng.choice([2, 4, 8])), int(rng.choice([10, 30, 80])), int(rng.choice([8, 25, 60]))
    lo, hi = [(2, 5), (4, 12), (8, 25)][int(rng.integers(3))]
    fam = str(rng.choice(["binomial", "poisson"]))
    mu = float(rng.choice([-3.0, -1.0, 0.5])) if fam == "binomial" else float(rng.choice([-1.0, 0.5, 1.5]))
    sd_id, sd_item = (float(rng.choice([0.3, 0.8, 1.5])) for _ in range(2))
    form = str(rng.choice(["y ~ x + (1 | id) + (1 | item)", "y ~ x + z + (1 | id) + (1 | item)",
                           "y ~ x + (1 | id) + (1 + x | item)"]))
    S = K * per
    m = rng.integers(lo, hi + 1, S)
    sid, site = np.repeat(np.arange(S), m), np.repeat(np.arange(S) // per, m)
    n = len(sid)
    item, x, z = rng.integers(0, I, n), rng.normal(size=n), rng.binomial(1, 0.5, S)[sid]
    slope = 0.4 * rng.normal(size=I) if "1 + x" in form else np.zeros(I)
    eta = mu + (0.5 + slope[item]) * x - 0.4 * z * ("z" in form) + rng.normal(0, sd_id, S)[sid] \
        + rng.normal(0, sd_item, I)[item]
    y = rng.binomial(1, 1 / (1 + np.exp(-eta))) if fam == "binomial" else rng.poisson(np.exp(np.minimum(eta, 8)))
    df = pd.DataFrame({"y": y, "x": x, "z": z, "id": [f"p{k}" for k in sid], "item": [f"i{k}" for k in item]})
    sites = {f"s{k}": df[site == k].reset_index(drop=True) for k in range(K)}
    return fam, form, n, I, K, sd_item, mu, df, sites


def draw_arguments(description: str):
    """The command line of a script over these draws (``--fits``, ``--seed``, ``--wide``, ``--crossed``): its
    parsed arguments and the draw function they choose."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--fits", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wide", action="store_true", help="the draws of draw_wide (more levels, rarer events)")
    ap.add_argument("--crossed", action="store_true", help="the draws of draw_crossed (subjects local, items shared)")
    a = ap.parse_args()
    return a, draw_crossed if a.crossed else draw_wide if a.wide else draw


def main() -> None:
    a, drawn = draw_arguments(__doc__.split("\n\n")[0])
    warnings.simplefilter("ignore")
    rounds = {"hybrid": [], "iterative": []}
    worst = {"logLik": 0.0, "fixef": 0.0}
    se_off = {"hybrid": [], "iterative": []}      # the standard errors' largest relative difference from the pooled
    bad = errors = 0
    print("fit family    rows levels sites  sd   mu  formula                       pooled"
          "  hybrid: rounds dlogLik dfixef dSE   iterative: rounds dlogLik dfixef dSE")
    for i in range(a.fits):
        fam, form, n, G, K, sd, mu, df, sites = drawn(a.seed + i)
        head = f"{a.seed + i:3d} {fam:9s} {n:5d} {G:5d} {K:4d} {sd:5.1f} {mu:4.1f}  {form:28s}"
        try:
            pooled = fedglmm.fit(form, df, family=fam)
            cells, flag = [], ""
            for method in ("hybrid", "iterative"):
                r = fedglmm.fit(form, sites, family=fam, method=method)
                dl = r.loglik - pooled.loglik
                df_ = float(np.max(np.abs(np.asarray(r.fixef) - np.asarray(pooled.fixef))))
                dse = float(np.max(np.abs(np.asarray(r.se) / np.asarray(pooled.se) - 1.0)))
                rounds[method].append(r.rounds)
                se_off[method].append(dse)
                worst["logLik"], worst["fixef"] = max(worst["logLik"], abs(dl)), max(worst["fixef"], df_)
                flag = "BAD" if abs(dl) > 1e-8 or df_ > 1e-6 else flag
                cells.append(f"{r.rounds:14d} {dl:8.1e} {df_:7.1e} {dse:7.1e}")
            bad += flag == "BAD"
            print(f"{head} {pooled.rounds:5d} {cells[0]}  {cells[1]} {flag}", flush=True)
        except Exception as e:          # a fit that stops is a finding: printed, counted, not raised
            errors += 1
            print(f"{head} ERR {type(e).__name__}: {str(e)[:100]}", flush=True)
    for method, rs in rounds.items():
        if rs:
            se = np.array(se_off[method])
            print(f"{method}: {len(rs)} fits, rounds in all {sum(rs)}, median {int(np.median(rs))}, max {max(rs)}; "
                  f"standard errors off the pooled ones by at most {se.max():.1e} (relative), above 1e-8 in "
                  f"{int(np.sum(se > 1e-8))}, above 1e-6 in {int(np.sum(se > 1e-6))}")
    print(f"largest |logLik - pooled| {worst['logLik']:.1e}, fixed effects {worst['fixef']:.1e}; "
          f"{bad} fit(s) BAD, {errors} stopped with an error")


if __name__ == "__main__":
    main()
