"""Parity of the analyst's toolbox with R on every reference case of tests/data/toolbox (lme4 1.1-31
anova() and confint(method = "profile"), lmerTest 3.1-3 Satterthwaite tables, posterior means by
50-node quadrature), with the rounds each took.  With --sites K the data are split over K sites by the
first grouping factor of the (first) formula; a fit the package refuses over that split is fitted pooled
and its `sites` column says 1.

    python3 benchmarks/bench_toolbox.py              # pooled, ~15 s
    python3 benchmarks/bench_toolbox.py --sites 3    # the data split over 3 sites by group
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.errors import FedGLMMError

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
TOOLBOX = DATA / "toolbox"


def cases(kind):
    tab = pd.read_csv(TOOLBOX / f"{kind}.tsv", sep="\t", dtype=str, keep_default_na=False)
    tab.columns = [c.lstrip("# ") for c in tab.columns]
    for _, row in tab.iterrows():
        yield dict(row), json.loads((TOOLBOX / f"{kind}_{row['name']}.json").read_text())


def r_name(name):
    return (name.replace("Intercept", "(Intercept)").replace("((Intercept))", "(Intercept)")
            .replace("[T.", "").replace("]", "").replace(" ** ", "^"))


def data_for(file, group, sites):
    d = pd.read_csv(DATA / file)
    if sites <= 1:
        return d
    codes = d[group].astype("category").cat.codes
    return {f"s{k}": d[codes % sites == k] for k in range(sites)}


def first_group(formula):
    return re.findall(r"\|\|?\s*([A-Za-z_.][\w.]*)\s*\)", formula)[0]


def fit(row, formulas, sites, **kw):
    """The case's model(s) fitted over `sites` sites split by the first formula's first grouping factor, or
    pooled where that split is refused (crossed factors); returns the fits and the number of sites used."""
    fam = row.get("family") or "gaussian"
    group = first_group(formulas[0])
    for k in dict.fromkeys((sites, 1)):
        data = data_for(row["data"], group, k)
        try:
            return [fedglmm.fit(f, data, family=fam, link=row.get("link") or None,
                                nagq=max(int(row.get("nagq") or 1), 1), reml=row["reml"] == "1", **kw)
                    for f in formulas], k
        except FedGLMMError:
            if k == 1:
                raise


def anova_table(sites):
    """Against `best` (per model the higher log-likelihood of lme4 and glmmTMB: lme4's GLMM deviance carries
    its PIRLS tolerance, 1e-5..3e-4) and against lme4's table as printed."""
    print(f"{'':42s} {'vs best (lme4/glmmTMB)':>21s} {'vs lme4 table':>21s}")
    print(f"{'anova case':36s} {'sites':>5s} {'|ΔChisq|':>10s} {'rel Δp':>10s} {'|ΔChisq|':>10s} {'rel Δp':>10s}"
          f" {'rounds':>7s}")
    for row, ref in cases("anova"):
        forms = [row[k] for k in ("formula0", "formula1", "formula2") if row.get(k)]
        try:
            fits, k = fit(row, forms, sites)
            tab = fedglmm.anova(*fits)
        except FedGLMMError as exc:
            print(f"{row['name']:36s} skipped: {str(exc)[:60]}")
            continue
        errs = []
        for rows in (ref["best"][1:], ref["table"][1:]):
            errs += [max(abs(tab["Chisq"].iloc[i + 1] - b["Chisq"]) for i, b in enumerate(rows)),
                     max(abs(tab["Pr(>Chisq)"].iloc[i + 1] / b["Pr(>Chisq)"] - 1) for i, b in enumerate(rows))]
        print(f"{row['name']:36s} {k:5d} " + " ".join(f"{e:10.1e}" for e in errs) + f" {tab.attrs['rounds']:7d}")


def _worst(ci, iv):
    if iv is None:
        return float("nan")
    return max(max(abs(lo - iv[r_name(k)][0]), abs(hi - iv[r_name(k)][1])) / (iv[r_name(k)][1] - iv[r_name(k)][0])
               for k, (lo, hi) in ci.iterrows())


def profile_table(sites):
    """Worst end error over the width against lme4's confint (a spline through its profile points) and
    against the reference's exact root-finding ends (where it has them)."""
    print(f"\n{'profile case':28s} {'sites':>5s} {'level':>5s} {'vs lme4':>9s} {'vs exact':>9s} {'rounds':>7s} {'seconds':>8s}")
    for row, ref in cases("profile"):
        try:
            (res,), k = fit(row, [row["formula"]], sites)
        except FedGLMMError as exc:
            print(f"{row['name']:28s} skipped: {str(exc)[:60]}")
            continue
        for level in (0.95, 0.9):
            lme4 = (ref.get("intervals") or {}).get(f"{level:g}")
            exact = ((ref.get("exact") or {}).get("intervals") or {}).get(f"{level:g}")
            exact = {k: (v["lower"], v["upper"]) for k, v in exact.items()} if exact else None
            ci = res.conf_int(level, method="profile")
            secs = res.profiles[round(level, 12)].attrs.get("seconds", float("nan"))
            print(f"{row['name']:28s} {k:5d} {level:5.2f} {_worst(ci, lme4):9.1e} {_worst(ci, exact):9.1e} "
                  f"{ci.attrs['rounds']:7d} {secs:8.2f}")


def lmertest_table(sites):
    print(f"\n{'lmerTest case':28s} {'sites':>5s} {'max rel Δdf':>12s} {'max rel Δp':>11s}")
    for row, ref in cases("lmertest"):
        try:
            (res,), k = fit(row, [row["formula"]], sites)
        except FedGLMMError as exc:
            print(f"{row['name']:28s} skipped: {str(exc)[:60]}")
            continue
        tab = res.tests()
        co = ref["coefficients"]
        ddf = max(abs(r["df"] / co[r_name(k)]["df"] - 1) for k, r in tab.iterrows())
        dp = max(abs(r["Pr(>|t|)"] / co[r_name(k)]["Pr(>|t|)"] - 1) for k, r in tab.iterrows())
        print(f"{row['name']:28s} {k:5d} {ddf:12.1e} {dp:11.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=1)
    args = ap.parse_args()
    if not TOOLBOX.exists():
        sys.exit("tests/data/toolbox is missing")
    warnings.simplefilter("ignore")
    anova_table(args.sites)
    profile_table(args.sites)
    lmertest_table(args.sites)


if __name__ == "__main__":
    main()
