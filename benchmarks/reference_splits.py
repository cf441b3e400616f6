#!/usr/bin/env python3
"""Rounds of the reference cases split as the reference's README splits them: one site per top-level unit.

usage: python3 benchmarks/reference_splits.py [--only REGEX] [--no-iterative] [--repeat N]

Every case of tests/data/shared_cases.tsv whose grouping factors nest in one column is split one site per
level of that column -- the grouping factor of a one-factor case (every group a site), LOCATION for
grouseticks' nested factors, herd for cbpp_olre (penicillin's crossed factors cannot be split so) -- and
fitted by the hybrid (the default) and the iterative method.  The table gives the sites, both methods'
rounds and fit seconds, the hybrid's decrements round by round, and the largest difference between the two
fits (fixed effects, θ, logLik); the last line the hybrid's rounds in all and the cases above 4.  With
``--repeat N`` each hybrid fit runs N more times and ``hyb_s`` is the median of those (the first, which
warms the caches, left out): what to compare when a change may cost the sites work (the fit time of a
reference case may not grow by more than 20 %).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.model.formula import parse_formula

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TOP = {"grouseticks_nested": "LOCATION", "grouseticks_olre": "LOCATION", "cbpp_olre": "herd"}


def main() -> None:
    from golden import cases

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="regex on case names")
    ap.add_argument("--no-iterative", action="store_true")
    ap.add_argument("--repeat", type=int, default=0, help="median hybrid fit seconds over this many more fits")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    shared = set(pd.read_csv(ROOT / "tests" / "data" / "shared_cases.tsv", sep="\t").iloc[:, 0])
    rows = []
    for case in cases():
        spec = parse_formula(case["formula"])
        column = TOP.get(case["name"], spec.group if len(spec.random) == 1 else None)
        if case["name"] not in shared or column is None or args.only and not re.search(args.only, case["name"]):
            continue
        df = pd.read_csv(case["data"])
        data = {str(k): part.reset_index(drop=True) for k, part in df.groupby(column, sort=False)}
        kw = dict(family=case["family"], link=case["link"], nagq=case["nagq"], reml=case["reml"],
                  **({"weights": case["weights"]} if case["weights"] else {}))
        hyb = fedglmm.fit(case["formula"], data, **kw)
        secs = [fedglmm.fit(case["formula"], data, **kw).seconds for _ in range(args.repeat)] or [hyb.seconds]
        row = {"case": case["name"], "by": column, "sites": len(data), "hybrid": hyb.rounds,
               "hyb_s": f"{statistics.median(secs):.2f}",
               "decrements": " ".join(f"{t['decrement']:.1g}" for t in hyb.trace)}
        if not args.no_iterative:
            it = fedglmm.fit(case["formula"], data, method="iterative", **kw)
            diff = max(np.max(np.abs(it.fixef - hyb.fixef)), abs(it.loglik - hyb.loglik),
                       np.max(np.abs(np.asarray(it.theta) - np.asarray(hyb.theta)), initial=0.0))
            row.update(iterative=it.rounds, it_s=f"{it.seconds:.2f}", max_diff=f"{diff:.1e}")
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    tab = pd.DataFrame(rows)
    print(tab.to_string(index=False))
    print(f"hybrid rounds in all {tab.hybrid.sum()}, above 4 in {(tab.hybrid > 4).sum()} of {len(tab)}: "
          + ", ".join(f"{r.case} {r.hybrid}" for r in tab.itertuples() if r.hybrid > 4))


if __name__ == "__main__":
    main()
