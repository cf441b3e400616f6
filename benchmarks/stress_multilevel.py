#!/usr/bin/env python3
"""Simulated multi-level data of the shapes users have, fitted over many sites by the hybrid (default) and
iterative methods: rounds, agreement, and the pooled fit.

usage: python3 benchmarks/stress_multilevel.py [--only REGEX] [--seed 11] [--reps 1]

Each scenario draws patients (or clusters) nested in hospitals, the hospitals dealt to sites by label
(several hospitals per site where there are more hospitals than sites), and fits the same formula split
over the sites with both methods and pooled (one site) with the default one.  Printed per fit: rows,
levels of each factor, sites, the hybrid's and iterative method's rounds, whether both converged, the
largest difference between the two split fits and between the split and pooled hybrid fits (relative,
over fixed effects, SDs, correlations and logLik), and the hybrid's wall time.

Scenarios (true values in the code; ``--reps`` draws each again with the next seeds):

* ``small_patients``: 40 hospitals (40 sites), 1-3 visits per patient (a third have one), binary;
* ``small_slope``: the same with 2-5 visits and ``(1 + time | patient)``;
* ``rare``: 1.5 % events, 30 hospitals of 15-60 patients (30 sites), ``(1 | patient) + (1 | hospital)``;
* ``many_hospitals``: 300 hospitals of 2-6 patients over 24 sites, poisson counts;
* ``three_level``: visits in patients in wards in 60 hospitals over 30 sites, poisson with an
  observation-level effect;
* ``hosp_slope``: gaussian, correlated slopes at both levels, 50 hospitals over 25 sites;
* ``crossed_in_site``: patients crossed with doctors inside each of 24 hospitals (one per site), binary;
* ``no_hospital_var``: binary with a hospital SD of 0 (a singular fit), 36 hospitals over 36 sites;
* ``unbalanced_sites``: 24 sites, one holding half of the 120 hospitals, sites of one hospital beside it.
"""
from __future__ import annotations

import argparse
import re
import time
import warnings

import numpy as np
import pandas as pd

import fedglmm

expit = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731


def nested(rng, H, pats, visits):
    """Row indices: hospital, patient (globally unique), visit time; ``pats(H)`` patients per hospital and
    ``visits(P)`` visits per patient."""
    npat = pats(H)
    hosp_of_pat = np.repeat(np.arange(H), npat)
    P = hosp_of_pat.size
    nv = visits(P)
    pat = np.repeat(np.arange(P), nv)
    t = np.concatenate([np.arange(k) for k in nv]) / 2.0
    return hosp_of_pat[pat], pat, t, P


def scenario(name, rng):
    """(formula, family, DataFrame with a 'site' column)."""
    if name in ("small_patients", "small_slope", "no_hospital_var"):
        H = 36 if name == "no_hospital_var" else 40
        vis = (lambda P: rng.integers(1, 4, P)) if name != "small_slope" else (lambda P: rng.integers(2, 6, P))
        hosp, pat, t, P = nested(rng, H, lambda H: rng.integers(20, 80, H), vis)
        trt, age = rng.integers(0, 2, P)[pat], rng.normal(size=P)[pat]
        b0, b1 = rng.normal(0, 1.2, P), rng.normal(0, 0.5, P)
        h = rng.normal(0, 0.0 if name == "no_hospital_var" else 0.5, H)
        eta = -0.4 + 0.5 * trt - 0.3 * age - 0.2 * t + b0[pat] + h[hosp] + (b1[pat] * t if name == "small_slope" else 0)
        y = rng.binomial(1, expit(eta))
        re_ = "(1 + time | patient)" if name == "small_slope" else "(1 | patient)"
        return (f"y ~ trt + age + time + {re_} + (1 | hospital)", "binomial",
                pd.DataFrame({"y": y, "trt": trt, "age": age, "time": t, "patient": pat, "hospital": hosp,
                              "site": hosp}))
    if name == "rare":
        hosp, pat, t, P = nested(rng, 30, lambda H: rng.integers(15, 60, H), lambda P: rng.integers(2, 8, P))
        x = rng.normal(size=hosp.size)
        z = rng.binomial(1, 0.3, P)[pat]
        eta = -4.6 + 0.4 * x + 0.6 * z + rng.normal(0, 0.8, P)[pat] + rng.normal(0, 0.4, 30)[hosp]
        y = rng.binomial(1, expit(eta))
        return ("y ~ x + z + (1 | patient) + (1 | hospital)", "binomial",
                pd.DataFrame({"y": y, "x": x, "z": z, "patient": pat, "hospital": hosp, "site": hosp}))
    if name == "many_hospitals":
        hosp, pat, t, P = nested(rng, 300, lambda H: rng.integers(2, 7, H), lambda P: rng.integers(1, 6, P))
        x = rng.normal(size=hosp.size)
        eta = 0.3 + 0.25 * x - 0.1 * t + rng.normal(0, 0.6, P)[pat] + rng.normal(0, 0.3, 300)[hosp]
        y = rng.poisson(np.exp(eta))
        return ("y ~ x + time + (1 | patient) + (1 | hospital)", "poisson",
                pd.DataFrame({"y": y, "x": x, "time": t, "patient": pat, "hospital": hosp, "site": hosp % 24}))
    if name == "three_level":
        H = 60
        wards = rng.integers(2, 5, H)
        ward_h = np.repeat(np.arange(H), wards)
        W = ward_h.size
        npat = rng.integers(3, 12, W)
        pat_w = np.repeat(np.arange(W), npat)
        P = pat_w.size
        nv = rng.integers(1, 5, P)
        pat = np.repeat(np.arange(P), nv)
        ward, hosp = pat_w[pat], ward_h[pat_w[pat]]
        n = pat.size
        x = rng.normal(size=n)
        eta = 0.2 + 0.3 * x + rng.normal(0, 0.5, P)[pat] + rng.normal(0, 0.3, W)[ward] \
            + rng.normal(0, 0.3, H)[hosp] + rng.normal(0, 0.4, n)
        y = rng.poisson(np.exp(eta))
        return ("y ~ x + (1 | hospital/ward/patient) + (1 | obs)", "poisson",
                pd.DataFrame({"y": y, "x": x, "patient": pat % 15, "ward": ward % 5, "hospital": hosp,
                              "obs": np.arange(n), "site": hosp % 30}))
    if name == "hosp_slope":
        hosp, pat, t, P = nested(rng, 50, lambda H: rng.integers(5, 25, H), lambda P: rng.integers(2, 7, P))
        trt = rng.integers(0, 2, P)[pat]
        bp = rng.normal(size=(P, 2)) * [1.0, 0.3]
        bh = rng.normal(size=(50, 2)) @ np.array([[0.5, 0.0], [0.1, 0.2]]).T
        y = 10 + 0.5 * t - trt + bp[pat, 0] + bp[pat, 1] * t + bh[hosp, 0] + bh[hosp, 1] * t + rng.normal(0, 1.0, t.size)
        return ("y ~ time + trt + (1 + time | patient) + (1 + time | hospital)", "gaussian",
                pd.DataFrame({"y": y, "time": t, "trt": trt, "patient": pat, "hospital": hosp, "site": hosp % 25}))
    if name == "crossed_in_site":
        rows = []
        for h in range(24):
            npat, ndoc = int(rng.integers(20, 60)), int(rng.integers(3, 9))
            nrow = npat * 4
            rows.append(pd.DataFrame({"patient": f"h{h}p" + pd.Series(rng.integers(0, npat, nrow)).astype(str),
                                      "doctor": f"h{h}d" + pd.Series(rng.integers(0, ndoc, nrow)).astype(str),
                                      "hospital": h, "x": rng.normal(size=nrow)}))
        df = pd.concat(rows, ignore_index=True)
        pc, dc = pd.factorize(df.patient)[0], pd.factorize(df.doctor)[0]
        eta = -0.3 + 0.4 * df.x + rng.normal(0, 0.9, pc.max() + 1)[pc] + rng.normal(0, 0.5, dc.max() + 1)[dc]
        df["y"] = rng.binomial(1, expit(eta))
        df["site"] = df.hospital
        return "y ~ x + (1 | patient) + (1 | doctor)", "binomial", df
    if name == "unbalanced_sites":
        hosp, pat, t, P = nested(rng, 120, lambda H: rng.integers(3, 30, H), lambda P: rng.integers(1, 6, P))
        x = rng.normal(size=hosp.size)
        eta = -0.8 + 0.3 * x + rng.normal(0, 0.8, P)[pat] + rng.normal(0, 0.4, 120)[hosp]
        y = rng.binomial(1, expit(eta))
        site = np.where(hosp < 60, 0, 1 + (hosp - 60) % 23)
        return ("y ~ x + (1 | patient) + (1 | hospital)", "binomial",
                pd.DataFrame({"y": y, "x": x, "patient": pat, "hospital": hosp, "site": site}))
    raise ValueError(name)


NAMES = ["small_patients", "small_slope", "rare", "many_hospitals", "three_level", "hosp_slope", "crossed_in_site",
         "no_hospital_var", "unbalanced_sites"]


def vec(res):
    return np.r_[res.fixef.to_numpy(), [r.get("sd", r.get("corr")) for r in res.random], res.residual_sd or 0.0,
                 res.loglik]


def rel(a, b):
    return float(np.max(np.abs(vec(a) - vec(b)) / np.maximum(1.0, np.abs(vec(a)))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'scenario':18s} {'rows':>6s} {'levels':>18s} {'sites':>5s} {'hyb':>4s} {'iter':>4s} {'pool':>4s} "
          f"{'conv':>5s} {'hyb-it':>8s} {'split-pool':>10s} {'hyb_s':>6s}")
    worst, fails = [], 0
    for name in NAMES:
        if args.only and not re.search(args.only, name):
            continue
        for rep in range(args.reps):
            rng = np.random.default_rng(args.seed + 1000 * rep + NAMES.index(name))
            formula, family, df = scenario(name, rng)
            data = {f"s{s}": part.drop(columns="site").reset_index(drop=True) for s, part in df.groupby("site")}
            try:
                t0 = time.perf_counter()
                hyb = fedglmm.fit(formula, data, family=family)
                sec = time.perf_counter() - t0
                it = fedglmm.fit(formula, data, family=family, method="iterative")
                pool = fedglmm.fit(formula, df.drop(columns="site"), family=family)
            except Exception as e:                               # noqa: BLE001 -- a stress test reports all
                print(f"{name:18s} error: {type(e).__name__}: {e}")
                fails += 1
                continue
            levels = "/".join(str(v) for v in hyb.ngroups.values())
            conv = "yes" if hyb.converged and it.converged else "NO"
            fails += conv == "NO"
            worst.append(hyb.rounds)
            print(f"{name:18s} {len(df):6d} {levels:>18s} {hyb.nsites:5d} {hyb.rounds:4d} {it.rounds:4d} "
                  f"{pool.rounds:4d} {conv:>5s} {rel(hyb, it):8.1e} {rel(hyb, pool):10.1e} {sec:6.2f}")
    if worst:
        print(f"hybrid rounds over sites: median {np.median(worst):g}, max {max(worst)}; failures {fails}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
