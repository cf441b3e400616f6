#!/usr/bin/env python3
"""Each hospital a site, with covariates of the hospital: the hybrid's rounds with and without them.

usage: python3 benchmarks/hospital_covariates_rounds.py [--seeds 10] [--family poisson|binomial] [--hospitals 20]

Data: ``tests/test_between.py``'s ``hospitals`` (H hospitals of 25-59 patients with 2-6 visits, a teaching flag
and a size per hospital, a treatment per patient), one site per hospital.  Fitted as
``y ~ time + trt + teach + size + (1 | patient) + (1 | hospital)`` and without the two hospital columns.
Printed per draw: the hybrid's rounds without and with them, the iterative method's with them, and the
largest relative difference between the hybrid's split fit and the pooled one; at the end the sums.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_between import FORMULA, hospitals  # noqa: E402

import fedglmm  # noqa: E402

PLAIN = "y ~ time + trt + (1 | patient) + (1 | hospital)"


def _vec(res):
    return np.r_[res.fixef.to_numpy(), [r["sd"] for r in res.random], res.loglik]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--family", default="poisson")
    ap.add_argument("--hospitals", type=int, default=20)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'seed':>4s} {'rows':>6s} {'without':>8s} {'with':>5s} {'iter':>5s} {'split-pool':>10s}")
    tot = np.zeros(3, int)
    for seed in range(args.seeds):
        df = hospitals(seed, args.family, args.hospitals)
        sites = {f"h{h}": d.reset_index(drop=True) for h, d in df.groupby("hospital")}
        plain = fedglmm.fit(PLAIN, sites, family=args.family)
        hyb = fedglmm.fit(FORMULA, sites, family=args.family)
        it = fedglmm.fit(FORMULA, sites, family=args.family, method="iterative")
        pool = fedglmm.fit(FORMULA, df, family=args.family)
        a, b = _vec(hyb), _vec(pool)
        diff = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))
        tot += [plain.rounds, hyb.rounds, it.rounds]
        print(f"{seed:4d} {len(df):6d} {plain.rounds:8d} {hyb.rounds:5d} {it.rounds:5d} {diff:10.1e}", flush=True)
    print(f"rounds in all: without {tot[0]}, with {tot[1]}, iterative with {tot[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
