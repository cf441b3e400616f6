#!/usr/bin/env python3
"""Rounds of the hybrid where each site holds several hospitals, patients nested in them (two grouping factors).

Random shapes (seeded; the hospitals dealt to the sites by label, several to a site): family (binomial,
poisson, negative binomial, Gamma with the log link, in turn), 2-6 sites, 2, 3, 5, 8 or 15 hospitals a site,
3, 8 or 20 patients a hospital, 1 to 2k - 1 visits a patient (k = 2, 4 or 8: many patients of one or two), a
treatment by hospital, a row covariate and time, a patient-level random intercept (SD 0.5, 1 or 1.5; in 30 %
of draws with a slope in time, SD 0.4), a hospital SD of 0, 0.1, 0.4 or 0.8, and for 40 % of the poisson
draws an observation-level effect (SD 0.5).  Each draw is fitted over the sites by the hybrid and by
the iterative method; printed: the shape, the rounds of each, and the largest difference between the two
(fixed effects and θ absolute, log-likelihood relative; "nan" where both end not converged, as under
separation, which their messages name).  At the end the rounds in all, the median, those above 4, the largest
difference, and the fits either method ended not converged.

    python3 benchmarks/nested_sites_rounds.py                  # draws 0-39
    python3 benchmarks/nested_sites_rounds.py --draws 40:80    # others
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import fedglmm  # noqa: E402

FAMILIES = ("binomial", "poisson", "negative_binomial", "gamma/log")


def draw(i: int) -> tuple[dict, str, dict]:
    rng = np.random.default_rng(5000 + i)
    fam = FAMILIES[i % len(FAMILIES)]
    shape = {"family": fam, "sites": int(rng.integers(2, 7)), "hosp/site": int(rng.choice([2, 3, 5, 8, 15])),
             "pat/hosp": int(rng.choice([3, 8, 20])), "visits": int(rng.choice([2, 4, 8])),
             "slope": bool(rng.random() < 0.3), "SD": float(rng.choice([0.5, 1.0, 1.5])),
             "hospSD": float(rng.choice([0.0, 0.1, 0.4, 0.8])),
             "olre": bool(fam == "poisson" and rng.random() < 0.4)}
    H = shape["sites"] * shape["hosp/site"]
    P = H * shape["pat/hosp"]
    hosp_of = np.repeat(np.arange(H), shape["pat/hosp"])
    nvis = np.maximum(1, rng.integers(1, 2 * shape["visits"], P))          # some patients of one visit
    pat = np.repeat(np.arange(P), nvis)
    n = len(pat)
    hosp = hosp_of[pat]
    time_ = np.concatenate([np.arange(k) for k in nvis]) / 4.0
    trt = (rng.random(H) < 0.5)[hosp].astype(float)
    x = rng.standard_normal(n)
    b = rng.normal(0, shape["SD"], P)[pat] + rng.normal(0, shape["hospSD"], H)[hosp]
    if shape["slope"]:
        b = b + rng.normal(0, 0.4, P)[pat] * time_
    if shape["olre"]:
        b = b + rng.normal(0, 0.5, n)
    base = -1.0 if fam == "binomial" else 0.2
    eta = base + 0.4 * x - 0.3 * trt + 0.2 * time_ + b
    mu = np.exp(eta)
    if fam == "binomial":
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    elif fam == "poisson":
        y = rng.poisson(mu).astype(float)
    elif fam == "negative_binomial":
        y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)
    else:
        y = rng.gamma(5.0, mu / 5.0)
    df = pd.DataFrame({"y": y, "x": x, "trt": trt, "time": time_, "patient": pat, "hospital": hosp,
                       "obs": np.arange(n)})
    sites = {f"s{k}": d.reset_index(drop=True) for k, d in df.groupby(hosp % shape["sites"])}
    formula = ("y ~ x + trt + time + " + ("(1 + time | patient)" if shape["slope"] else "(1 | patient)")
               + " + (1 | hospital)" + (" + (1 | obs)" if shape["olre"] else ""))
    return shape, formula, sites


def difference(a, b) -> float:
    return max(float(np.max(np.abs(a.fixef.to_numpy() - b.fixef.to_numpy()))),
               float(np.max(np.abs(np.asarray(a.theta) - np.asarray(b.theta)))),
               abs(a.loglik - b.loglik) / max(1.0, abs(b.loglik)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", default="0:40")
    args = ap.parse_args()
    lo, hi = (int(v) for v in args.draws.split(":"))
    print(f"{'draw':>4} {'family':17s} {'sites':>5} {'hosp':>4} {'pat':>3} {'vis':>3} {'slope':>5} {'olre':>5} "
          f"{'SD':>4} {'hSD':>4} {'rows':>6} {'hybrid':>6} {'iter':>4} {'diff':>8}")
    rounds, worst, stopped, t0 = [], 0.0, 0, time.perf_counter()
    for i in range(lo, hi):
        shape, formula, sites = draw(i)
        fam, _, link = shape["family"].partition("/")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                h = fedglmm.fit(formula, sites, family=fam, link=link or None)
                it = fedglmm.fit(formula, sites, family=fam, link=link or None, method="iterative")
            except fedglmm.FedGLMMError as exc:
                print(f"{i:4d} {shape['family']:17s} error: {exc}")
                continue
        # (two fits that both end not converged -- separation, named in their messages -- are not compared)
        d = difference(h, it) if h.converged or it.converged else np.nan
        worst = max(worst, d) if np.isfinite(d) else worst
        rounds.append(h.rounds)
        stopped += not (h.converged and it.converged)
        print(f"{i:4d} {shape['family']:17s} {shape['sites']:5d} {shape['hosp/site']:4d} {shape['pat/hosp']:3d} "
              f"{shape['visits']:3d} {str(shape['slope']):>5} {str(shape['olre']):>5} {shape['SD']:4.1f} "
              f"{shape['hospSD']:4.1f} {sum(len(s) for s in sites.values()):6d} {h.rounds:6d} {it.rounds:4d} {d:8.1e}")
    r = np.array(rounds)
    print(f"{len(r)} fits in {time.perf_counter() - t0:.0f} s: hybrid rounds {r.sum()} in all, "
          f"median {np.median(r):g}, max {r.max()}, above 4 in {(r > 4).sum()}; "
          f"largest difference from the iterative fit {worst:.1e}; not converged (either method) {stopped}")


if __name__ == "__main__":
    main()
