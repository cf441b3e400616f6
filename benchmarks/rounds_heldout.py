#!/usr/bin/env python3
"""Rounds of the hybrid (the default) and the iterative method on the held-out `rounds` cases.

usage: python3 benchmarks/rounds_heldout.py [--only REGEX] [--cases TSV ...] [--splits pooled,split,each,K,Kb]
                                           [--each-max N]

For every case of tests/data/heldout/rounds/cases.tsv (and any other case table given), pooled (one site)
and split over sites: by the case's `split` column when it is not the grouping factor itself (e.g.
`sim_many_sites`: 50 sites), otherwise by group into 3 sites (labels in order of appearance, dealt
round-robin); with `--splits each` also every group a site of its own (cases of at most 120 groups, or --each-max), with
`--splits 5,10b` (say) over 5 sites dealt round-robin by group and over 10 sites each a run of groups cut at
random (sites of unequal size; seeded by the number of sites).
The table gives both methods' rounds, the largest difference between the two fits (fixed effects, θ, logLik;
and ``se_rel``, the fixed effects' standard errors, relative), the hybrid's logLik against the better of
lme4/glmmTMB (full log-likelihood: lme4's nAGQ > 1 value, with its modes converged where aghq_at_lme4.tsv has it,
plus the saturated term), and both methods' fit times.
The last lines give the median and largest number of hybrid rounds.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.model.formula import parse_formula

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = ROOT / "tests" / "data" / "heldout" / "rounds" / "cases.tsv"
sys.path.insert(0, str(ROOT / "tests"))
from reference import best_reference, read_cases  # noqa: E402


def site_data(case: dict, how: str):
    """The case's data pooled (one DataFrame) or split over sites (a dict)."""
    df = pd.read_csv(case["data"])
    if how == "pooled":
        return df
    group = parse_formula(case["formula"]).group
    if how == "each":          # every group a site of its own (a registry of many small sites)
        return {str(k): part.reset_index(drop=True) for k, part in df.groupby(group, sort=False)}
    if how[0].isdigit():       # K sites by group: dealt round-robin ("5"), or in runs of unequal length ("5b")
        codes = pd.factorize(df[group])[0]
        k = min(int(how.rstrip("b")), int(codes.max()))        # (no more sites than groups)
        if how.endswith("b"):
            cuts = np.sort(np.random.default_rng(k).choice(np.arange(1, codes.max()), k - 1, replace=False))
            site = np.searchsorted(cuts, codes, side="right")
        else:
            site = codes % k
        return {f"s{i}": df[site == i].reset_index(drop=True) for i in range(k)}
    col = case["split"] if case["split"] and case["split"] != group else None
    if col is not None:
        return {str(k): part.reset_index(drop=True) for k, part in df.groupby(col, sort=False)}
    codes = pd.factorize(df[group])[0] if group else np.arange(len(df))
    return {f"s{i}": df[codes % 3 == i].reset_index(drop=True) for i in range(3)}


def fit_options(case: dict) -> dict:
    """A case's keyword arguments of fedglmm.fit beside its formula and data."""
    return dict(family=case["family"], link=case["link"], nagq=case["nagq"], reml=case["reml"],
                **({"weights": case["weights"]} if case["weights"] else {}))


def run(case: dict, how: str) -> dict:
    data = site_data(case, how)
    kw = fit_options(case)
    res = {}
    for method in ("iterative", "hybrid"):
        try:
            res[method] = fedglmm.fit(case["formula"], data, method=method, **kw)
        except fedglmm.FedGLMMError as e:
            res[method] = str(e).splitlines()[0][:50]
    a, b = res["iterative"], res["hybrid"]
    row = {"case": case["name"], "sites": 1 if how == "pooled" else len(data), "split": how}
    if isinstance(a, str) or isinstance(b, str):
        row.update(it_rounds=a if isinstance(a, str) else a.rounds, hyb_rounds=b if isinstance(b, str) else b.rounds)
        return row
    diff = max(np.max(np.abs(a.fixef - b.fixef)), np.max(np.abs(np.asarray(a.theta) - np.asarray(b.theta)),
                                                         initial=0.0), abs(a.loglik - b.loglik))
    sa, sb = np.asarray(a.se, float), np.asarray(b.se, float)
    se = np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-300), initial=0.0)
    ref = best_reference(case)
    row.update(it_rounds=a.rounds, hyb_rounds=b.rounds, max_diff=f"{diff:.1e}", se_rel=f"{se:.1e}",
               vs_ref="" if ref is None else f"{b.loglik - ref:+.1e}", it_s=f"{a.seconds:.2f}",
               hyb_s=f"{b.seconds:.2f}", hyb_bytes=b.bytes_to_sites + b.bytes_from_sites)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="regex on case names")
    ap.add_argument("--cases", nargs="*", type=Path, default=[ROUNDS])
    ap.add_argument("--splits", default="pooled,split",
                    help="pooled (one site), split (the case's sites, or 3 by group), each (every group a site "
                         "of its own; cases of at most --each-max groups), K (K sites by group, dealt round-robin), Kb "
                         "(K sites of runs of groups cut at random: sites of unequal size)")
    ap.add_argument("--each-max", type=int, default=120, help="the most groups a case split by `each` may have")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for table in args.cases:
        for case in read_cases(table):
            if args.only and not re.search(args.only, case["name"]):
                continue
            for how in args.splits.split(","):
                if how == "each" and pd.read_csv(case["data"])[parse_formula(case["formula"]).group].nunique() \
                        > args.each_max:
                    continue                # (sites of one group each: at most --each-max)
                rows.append(run(case, how))
                print(rows[-1], file=sys.stderr, flush=True)
    tab = pd.DataFrame(rows)
    print(tab.to_string(index=False))
    ok = tab[[isinstance(r, (int, np.integer)) for r in tab.hyb_rounds]]
    hr, se = ok.hyb_rounds.astype(int), pd.to_numeric(ok.se_rel)
    print(f"hybrid rounds: median {np.median(hr):g}, max {hr.max()}, > 4 in {(hr > 4).sum()} of {len(tab)}; "
          f"failures {len(tab) - len(ok)}; largest difference to iterative "
          f"{pd.to_numeric(ok.max_diff).max():.1e} (standard errors, relative: {se.max():.1e}, above 1e-8 in "
          f"{(se > 1e-8).sum()}); worst logLik against the better reference "
          f"{pd.to_numeric(ok.vs_ref, errors='coerce').min():+.1e}")


if __name__ == "__main__":
    main()
