#!/usr/bin/env python3
"""Sanity check of the held-out reference cases (tests/data/heldout/<group>/cases.tsv).

For every case: the data CSV reads with pandas; every variable of the formula (and the weights and split
columns) is a column; every level of the first grouping factor lies within one level of `split` (rows with a
missing group or split value left out); NAME.json exists (and NAME.tmb.json for nagq <= 1); files are at
most 1.5 MB. Prints a table (case, rows, groups, family, split levels) and, with --fits, the references'
logLik, the difference glmmTMB - lme4, fit seconds and the number of convergence messages.

usage (from the repo root): python3 benchmarks/r/check_heldout.py [--fits] [group ...]
Exit status 1 if any check fails.
"""
import json
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path("tests/data/heldout")
FUNCS = {"I", "poly", "scale", "log", "exp", "sqrt", "offset", "cbind", "mean", "sd"}


def read_cases(path):
    lines = path.read_text().splitlines()
    header = lines[0].lstrip("#").strip().split("\t")
    rows = [dict(zip(header, ln.split("\t"))) for ln in lines[1:] if ln.strip() and not ln.startswith("#")]
    return header, rows


def variables(formula):
    # identifiers that are not function names (followed by "(") nor numbers
    out = []
    for m in re.finditer(r"[A-Za-z_.][A-Za-z0-9_.]*", formula):
        tail = formula[m.end():].lstrip()
        if tail.startswith("("):
            continue
        if m.group() not in out:
            out.append(m.group())
    return out


def first_group(formula):
    m = re.search(r"\|\|?\s*([A-Za-z_.][A-Za-z0-9_.]*)\s*\)", formula)
    return m.group(1) if m else None


def main(argv):
    fits = "--fits" in argv
    groups = [a for a in argv if not a.startswith("--")] or sorted(p.name for p in ROOT.iterdir() if p.is_dir())
    problems, table, fit_rows = [], [], []
    for grp in groups:
        d = ROOT / grp
        for f in d.iterdir():
            if f.stat().st_size > 1.5e6:
                problems.append(f"{f}: {f.stat().st_size} bytes > 1.5 MB")
        header, cases = read_cases(d / "cases.tsv")
        for need in ("name", "data", "formula", "family", "nagq", "reml", "weights", "split"):
            if need not in header:
                problems.append(f"{grp}/cases.tsv: no column {need}")
        for c in cases:
            name = c["name"]
            try:
                df = pd.read_csv(d / f"{c['data']}.csv")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{grp}/{name}: {c['data']}.csv does not read: {e}")
                continue
            need = variables(c["formula"]) + [v for v in (c.get("weights"), c.get("split")) if v]
            miss = [v for v in need if v not in df.columns]
            if miss:
                problems.append(f"{grp}/{name}: columns {miss} not in {c['data']}.csv")
                continue
            g, s = first_group(c["formula"]), c["split"]
            both = df[list(dict.fromkeys([g, s]))].dropna()  # g may be the split column itself
            nsplit = both.groupby(g)[s].nunique() if g != s else pd.Series(1, index=both[g].unique())
            if (nsplit > 1).any():
                problems.append(f"{grp}/{name}: {int((nsplit > 1).sum())} levels of {g} at several {s} levels")
            jl = d / f"{name}.json"
            jt = d / f"{name}.tmb.json"
            if not jl.exists():
                problems.append(f"{grp}/{name}: no {jl.name}")
            if int(c["nagq"]) <= 1 and not jt.exists():
                problems.append(f"{grp}/{name}: no {jt.name}")
            L = json.loads(jl.read_text()) if jl.exists() else {}
            T = json.loads(jt.read_text()) if jt.exists() else {}
            n_used = L.get("n", T.get("n", len(df)))
            table.append((grp, name, len(df), n_used, both[g].nunique(), c["family"], c["nagq"], s,
                          both[s].nunique()))
            msgs = lambda J: len(J.get("messages") or [])  # noqa: E731
            fit_rows.append((grp, name, L.get("logLik"), T.get("logLik"), L.get("seconds"), T.get("seconds"),
                             msgs(L), msgs(T), L.get("loglik_comparable", True), T.get("pdHess")))
    print(f"{'group':9} {'case':24} {'rows':>5} {'used':>5} {'groups':>6} {'family':17} {'nAGQ':>4} "
          f"{'split':10} {'levels':>6}")
    for r in table:
        print(f"{r[0]:9} {r[1]:24} {r[2]:5d} {r[3]:5d} {r[4]:6d} {r[5]:17} {r[6]:>4} {r[7]:10} {r[8]:6d}")
    if fits:
        print()
        print(f"{'group':9} {'case':24} {'logLik lme4':>14} {'logLik glmmTMB':>14} {'TMB - lme4':>11} "
              f"{'s lme4':>6} {'s TMB':>6} {'msg':>7} {'comparable':>10} {'pdHess':>6}")
        for r in fit_rows:
            diff = f"{r[3] - r[2]:11.4f}" if r[2] is not None and r[3] is not None else f"{'':11}"
            fmt = lambda v, w, p: f"{v:{w}.{p}f}" if v is not None else f"{'':{w}}"  # noqa: E731
            print(f"{r[0]:9} {r[1]:24} {fmt(r[2], 14, 4)} {fmt(r[3], 14, 4)} {diff} {fmt(r[4], 6, 2)} "
                  f"{fmt(r[5], 6, 2)} {r[6]:>3}/{r[7]:<3} {str(r[8]):>10} {str(r[9]):>6}")
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print(" ", p)
        return 1
    print(f"\nall checks passed: {len(table)} cases in {len(groups)} groups")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
