#!/usr/bin/env python3
"""Parity of fedglmm's multi-level fits (several grouping factors) with lme4 and glmmTMB, case by case.

usage: python3 benchmarks/parity_multilevel.py [--only REGEX] [--which all|shared|heldout] [--no-split]
                                               [--iterative] [--sites K] [--modes]

For every case of tests/multilevel_reference.py (the multi-level rows of the shared reference table and
the 52 held-out cases of tests/data/heldout/multilevel/) it fits the pooled rows with the default
(hybrid) method and prints: rounds, fit seconds, logLik minus the better comparable reference, and the
criteria the fit misses (see tests/multilevel_reference.py; empty = all met).  With a split column it
also fits the rows split over sites by that column (one site per level, or ``--sites K``: K sites, the
column's codes mod K) and prints the largest relative difference from the pooled fit (estimates, SDs,
correlations, logLik), that of the standard errors, the number of sites and the rounds -- or the refusal --
and at the end the split fits' rounds in all and how many took more than 4.  ``--iterative`` adds the
iterative method's rounds; ``--modes`` fits each split by both methods and prints how far their conditional
modes and SDs are from the pooled fit's (the largest over all at the end).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from multilevel_reference import cases, compare, fit, split_sites  # noqa: E402

from fedglmm.errors import FedGLMMError  # noqa: E402


def _vector(res):
    """Estimates, SDs and correlations, residual SD and logLik (standard errors apart: the hybrid takes them
    from the Hessian at the last point visited, moved to the estimate by a secant step: to about 1e-4)."""
    return np.r_[res.fixef.to_numpy(), [r.get("sd", r.get("corr")) for r in res.random], res.residual_sd or 0.0,
                 res.loglik]


def _modes_gap(a, b) -> float:
    """The largest absolute difference of two fits' conditional modes and SDs (every factor, every level)."""
    gap = 0.0
    for g in a.modes:
        for x, y in ((a.modes[g], b.modes[g]), (a.condsd[g], b.condsd[g])):
            gap = max(gap, float(np.nanmax(np.abs(x.to_numpy() - y.loc[x.index].to_numpy()))))
    return gap


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--which", default="all")
    ap.add_argument("--no-split", action="store_true")
    ap.add_argument("--iterative", action="store_true")
    ap.add_argument("--modes", action="store_true",
                    help="with a split, also fit it by the iterative method, and print the largest difference of "
                         "either split fit's conditional modes and SDs from the pooled fit's")
    ap.add_argument("--sites", type=int, default=None,
                    help="split each case over this many sites (codes of its split column mod K) instead of one "
                         "site per level")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'case':28s} {'rounds':>6s} {'iter':>4s} {'sec':>6s} {'ΔlogLik':>9s} {'split: Δ, ΔSE, sites, rounds':>30s}  misses")
    nfail, split_rounds, gaps = 0, [], []
    for case in cases(args.which):
        if args.only and not re.search(args.only, case["name"]):
            continue
        t0 = time.perf_counter()
        try:
            res = fit(case)
        except (FedGLMMError, TypeError) as e:
            print(f"{case['name']:28s} error: {e}")
            nfail += 1
            continue
        sec = time.perf_counter() - t0
        best = max(r["logLik"] for r in case["refs"] if r.get("loglik_comparable", True) is not False)
        misses = compare(res, case)
        it = fit(case, method="iterative").rounds if args.iterative else ""
        split = ""
        if case["split"] and not args.no_split:
            try:
                sres = fit(case, data=split_sites(case, args.sites))
                split_rounds.append(sres.rounds)
                a, b = _vector(res), _vector(sres)
                dse = np.max(np.abs(res.se.to_numpy() / sres.se.to_numpy() - 1))
                split = (f"{np.max(np.abs(a - b) / np.maximum(1, np.abs(a))):.1e} {dse:.0e} "
                         f"({sres.nsites} sites, {sres.rounds} r)")
                if args.modes:
                    ires = fit(case, data=split_sites(case, args.sites), method="iterative")
                    gap = max(_modes_gap(res, sres), _modes_gap(res, ires))
                    gaps.append(gap)
                    split += f" modes {gap:.0e}"
            except FedGLMMError as e:
                split = "refused"
                misses = misses + ([] if "present at sites" in str(e) else [f"split: {e}"])
        nfail += bool(misses)
        print(f"{case['name']:28s} {res.rounds:6d} {it!s:>4s} {sec:6.2f} {res.loglik - best:9.2e} {split:>30s}  "
              + "; ".join(misses))
    if split_rounds:
        print(f"split fits: {len(split_rounds)}, rounds in all {sum(split_rounds)}, "
              f"above 4 rounds {sum(r > 4 for r in split_rounds)}")
    if gaps:
        print(f"conditional modes and SDs of the split fits (hybrid and iterative) against the pooled fit's: "
              f"largest difference {max(gaps):.1e}")
    print(f"{nfail} case(s) miss a criterion")
    return 0


if __name__ == "__main__":
    sys.exit(main())
