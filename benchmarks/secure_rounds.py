#!/usr/bin/env python3
"""Secure aggregation against the plain fit and the pooled one, on the held-out one-factor cases.

usage: python3 benchmarks/secure_rounds.py [--only REGEX] [--split 5] [--method hybrid]

Every binomial and poisson case of tests/data/heldout/rounds/cases.tsv is fitted pooled, and split over sites
(``--split``, as benchmarks/rounds_heldout.py splits: K sites by group, ``each``, ``split``) both plain and
with ``secure_aggregation=True``.  Printed per case: the rounds of each split fit, the largest relative
difference of the secure fit's standard errors from the plain fit's and from the pooled fit's, and its logLik
minus the plain one; last the rounds in all and the largest differences.  About a minute on a 2-core machine.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import numpy as np

import fedglmm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds_heldout import ROUNDS, fit_options, read_cases, site_data  # noqa: E402


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a / b - 1.0), initial=0.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=".", help="cases whose name matches this regular expression")
    ap.add_argument("--split", default="5", help="how the rows go to sites (benchmarks/rounds_heldout.py)")
    ap.add_argument("--method", default="hybrid", choices=["hybrid", "iterative"])
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    only = re.compile(a.only)
    total = {"plain": 0, "secure": 0}
    worst = {"plain": 0.0, "pooled": 0.0, "logLik": 0.0}
    print(f"{'case':24s} {'sites':>5s} {'plain':>5s} {'secure':>6s}  {'dSE plain':>9s} {'dSE pooled':>10s} "
          f"{'dlogLik':>8s}")
    for case in read_cases(ROUNDS):
        if case["family"] not in ("binomial", "poisson") or not only.search(case["name"]):
            continue
        kw = fit_options(case)
        data = site_data(case, a.split)
        try:
            pooled = fedglmm.fit(case["formula"], site_data(case, "pooled"), **kw)
            plain = fedglmm.fit(case["formula"], data, method=a.method, **kw)
            secure = fedglmm.fit(case["formula"], data, method=a.method, secure_aggregation=True, **kw)
        except fedglmm.FedGLMMError as e:
            print(f"{case['name']:24s} ERR {str(e).splitlines()[0][:80]}")
            continue
        d_plain, d_pooled = _rel(secure.se, plain.se), _rel(secure.se, pooled.se)
        dl = secure.loglik - plain.loglik
        total["plain"] += plain.rounds
        total["secure"] += secure.rounds
        worst = {"plain": max(worst["plain"], d_plain), "pooled": max(worst["pooled"], d_pooled),
                 "logLik": max(worst["logLik"], abs(dl))}
        print(f"{case['name']:24s} {len(data):5d} {plain.rounds:5d} {secure.rounds:6d}  {d_plain:9.1e} "
              f"{d_pooled:10.1e} {dl:8.1e}", flush=True)
    print(f"rounds in all: plain {total['plain']}, secure {total['secure']}; secure standard errors off the plain "
          f"ones by at most {worst['plain']:.1e}, off the pooled ones by {worst['pooled']:.1e} (relative); "
          f"|logLik - plain| at most {worst['logLik']:.1e}")


if __name__ == "__main__":
    main()
