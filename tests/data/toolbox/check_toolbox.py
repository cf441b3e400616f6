#!/usr/bin/env python3
"""Sanity check of the toolbox reference files (tests/data/toolbox): no R, no fedglmm.

usage: python3 tests/data/toolbox/check_toolbox.py      (exit status 1 on any problem)

* every *.json here parses (strict JSON: no NaN/Infinity) and belongs to a row of its case table;
* every row of anova.tsv, profile.tsv, lmertest.tsv and varcorr.tsv has its JSON, and its data file exists;
* every variable of every formula is a column of the data file;
* light consistency: anova tables have one row per model, lower <= upper in the profile intervals,
  lmerTest tables have the five columns, and the JSON repeats its case's formula.
"""
import csv
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
TABLES = {"anova": ("formula0", "formula1", "formula2"), "profile": ("formula",),
          "lmertest": ("formula",), "varcorr": ("formula",)}
FUNCS = {"cbind", "I", "offset", "log", "exp", "sqrt", "scale", "poly"}


def read_tsv(path):
    lines = path.read_text().splitlines()
    header = lines[0].lstrip("# ").split("\t")
    rows = []
    for ln in lines[1:]:
        if not ln.strip() or ln.startswith("#"):
            continue
        vals = ln.split("\t")
        vals += [""] * (len(header) - len(vals))
        rows.append(dict(zip(header, vals)))
    return rows


def formula_vars(f):
    """Variable names in an lme4-style formula (function names and numbers left out)."""
    out = set()
    for m in re.finditer(r"[A-Za-z_.][A-Za-z0-9_.]*", f):
        name = m.group(0)
        rest = f[m.end():].lstrip()
        if rest.startswith("(") or name in FUNCS or re.fullmatch(r"\.?\d.*", name):
            continue
        out.add(name)
    return out


def strict_load(path):
    def bad_constant(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(path.read_text(), parse_constant=bad_constant)


def main():
    problems = []
    seen = set()
    columns = {}
    for kind, fcols in TABLES.items():
        tsv = HERE / f"{kind}.tsv"
        for row in read_tsv(tsv):
            name = row["name"]
            jpath = HERE / f"{kind}_{name}.json"
            seen.add(jpath.name)
            dpath = DATA / row["data"]
            if not dpath.exists():
                problems.append(f"{kind}/{name}: data file {row['data']} missing")
                continue
            if dpath not in columns:
                with dpath.open(newline="") as fh:
                    columns[dpath] = set(next(csv.reader(fh)))
            formulas = [row[c] for c in fcols if row.get(c)]
            for f in formulas:
                missing = formula_vars(f) - columns[dpath]
                if missing:
                    problems.append(f"{kind}/{name}: {sorted(missing)} not columns of {row['data']}")
            if not jpath.exists():
                problems.append(f"{kind}/{name}: {jpath.name} missing")
                continue
            try:
                j = strict_load(jpath)
            except ValueError as e:
                problems.append(f"{jpath.name}: {e}")
                continue
            if j.get("name") != name or j.get("data") != row["data"]:
                problems.append(f"{jpath.name}: name/data do not match the table row")
            if kind == "anova":
                if list(j["formulas"].values()) != formulas:
                    problems.append(f"{jpath.name}: formulas differ from anova.tsv")
                if len(j["table"]) != len(formulas):
                    problems.append(f"{jpath.name}: {len(j['table'])} table rows for {len(formulas)} models")
                for r in j["table"]:
                    for col in ("npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"):
                        if col not in r:
                            problems.append(f"{jpath.name}: table row without {col}")
            else:
                if j.get("formula") != formulas[0]:
                    problems.append(f"{jpath.name}: formula differs from {kind}.tsv")
            if kind == "profile":
                ivs = j.get("intervals") or {}
                if not ivs and not j.get("exact"):
                    problems.append(f"{jpath.name}: neither lme4 nor exact intervals")
                for lv, ci in ivs.items():
                    for p, (lo, up) in ci.items():
                        if lo is not None and up is not None and lo > up:
                            problems.append(f"{jpath.name}: {p} @{lv}: lower > upper")
                lv_want = {f"{float(x):g}" for x in row["levels"].split(",")}
                if ivs and set(ivs) != lv_want:
                    problems.append(f"{jpath.name}: levels {sorted(ivs)} != {sorted(lv_want)}")
            if kind == "lmertest":
                for p, r in j["coefficients"].items():
                    if set(r) != {"Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"}:
                        problems.append(f"{jpath.name}: coefficient row {p} has columns {sorted(r)}")
    for p in sorted(HERE.glob("*.json")):
        if p.name not in seen:
            try:
                strict_load(p)
            except ValueError as e:
                problems.append(f"{p.name}: {e}")
            problems.append(f"{p.name}: not listed in any case table")
    n_json = len(list(HERE.glob("*.json")))
    for msg in problems:
        print("PROBLEM:", msg)
    print(f"{n_json} JSON files, {len(seen)} table rows, {len(columns)} data files: "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
