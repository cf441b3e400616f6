"""One-shot and hybrid fits against the exact (iterative) fit, on every reference case.

For each case and moment order K (2, 3, 4; gaussian models are exact and have no K) the table gives the
largest |one-shot − exact| / SE over the fixed effects (SE of the exact fit) and over the variance
components (SDs and correlations, in units of the exact value's... absolute difference / max(0.05, SD)),
the one-shot rounds, bytes and time, and the hybrid's rounds and its largest difference from the
iterative fit.  Groups smaller than the sites' default minimum (10 rows) are refused one-shot summaries;
so that every case gets a one-shot number, the one-shot columns use --min-group 1 and say so; the hybrid
columns use the default (a refused one-shot falls back to site totals).

usage: python3 benchmarks/bench_oneshot.py [--only REGEX] [--orders 2,3,4]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.site.summaries import summarize, to_jsonable

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data"


def cases():
    tab = pd.read_csv(DATA / "cases.tsv", sep="\t", dtype=str)
    tab.columns = [c.lstrip("# ") for c in tab.columns]
    for _, r in tab.iterrows():
        yield r["name"], DATA / f"{r['data']}.csv", r["formula"], r["family"], max(int(r["nagq"]), 1), r["reml"] == "1"


def vc(res):
    return np.array([r.get("sd", r.get("corr")) for r in res.random] + ([res.residual_sd] if res.residual_sd else []))


def compare(a, exact):
    fe = np.max(np.abs(a.fixef.to_numpy() - exact.fixef.to_numpy()) / exact.se.to_numpy())
    va, ve = vc(a), vc(exact)
    vcd = np.max(np.abs(va - ve) / np.maximum(np.abs(ve), 0.05)) if len(ve) else 0.0
    return fe, vcd


def oneshot_unguarded(sites, formula, family, nagq, reml, order):
    """The one-shot fit with every group's summaries (no minimum size, no moment guard): accuracy only."""
    from fedglmm.methods.oneshot import fit_from_messages
    from fedglmm.model.options import fit_request
    from fedglmm.site.summaries import summarize

    msgs = {sid: summarize(f, formula, family, None, sid, order=order, min_group=1, guard=False)
            for sid, f in sites.items()}
    return fit_from_messages(msgs, fit_request(formula, family, nagq=nagq, reml=reml, method="oneshot"), rounds=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None)
    ap.add_argument("--orders", default="2,3,4")
    args = ap.parse_args(argv)
    orders = [int(k) for k in args.orders.split(",")]
    head = (f"{'case':22s} {'it_rounds':>9s} {'hyb_rounds':>10s} {'hyb-it':>8s} {'hyb_s':>6s}   "
            f"{'K':>2s} {'fe/SE':>7s} {'vc rel':>7s} {'KiB_from':>8s} {'one_s':>6s}")
    print(head)
    print("-" * len(head))
    for name, path, formula, family, nagq, reml in cases():
        if args.only and not re.search(args.only, name):
            continue
        df = pd.read_csv(path)
        group = fedglmm.model.formula.parse_formula(formula).group
        codes = pd.factorize(df[group])[0]
        sites = {f"s{i}": df[codes % 3 == i].reset_index(drop=True) for i in range(3)}
        kw = dict(family=family, nagq=nagq, reml=reml)
        exact = fedglmm.fit(formula, sites, method="iterative", **kw)
        t = time.perf_counter()
        hyb = fedglmm.fit(formula, sites, method="hybrid", **kw)
        hs = time.perf_counter() - t
        hd = max(np.max(np.abs(hyb.fixef - exact.fixef)), np.max(np.abs(vc(hyb) - vc(exact))))
        left = f"{name:22s} {exact.rounds:9d} {hyb.rounds:10d} {hd:8.1e} {hs:6.2f}   "
        for k in (orders if family != "gaussian" else [0]):
            t = time.perf_counter()
            one = oneshot_unguarded(sites, formula, family, nagq, reml, max(k, 2))
            sec = time.perf_counter() - t
            fe, vcd = compare(one, exact)
            kib = sum(len(json.dumps(to_jsonable(summarize(f, formula, family, None, s, order=max(k, 2),
                                                           min_group=1, guard=False))))
                      for s, f in sites.items()) / 1024
            print(left + f"{k if k else '-':>2} {fe:7.3f} {vcd:7.3f} {kib:8.1f} {sec:6.2f}")
            left = " " * len(left)
    print("\nit/hyb_rounds: rounds of the iterative and hybrid fits (default settings, 3 sites); hyb-it: largest "
          "difference between them over fixed effects and variance components.\nK, fe/SE, vc rel: the one-shot "
          "fit with moments up to order K (gaussian: exact sufficient statistics), built with every group's "
          "summaries (no minimum size, no moment guard: an accuracy study), against the exact fit: largest "
          "|difference| / SE over the fixed effects, and largest |difference| / max(|exact|, 0.05) over SDs "
          "and correlations; KiB_from: size of the sites' summary files.")


if __name__ == "__main__":
    sys.exit(main())
