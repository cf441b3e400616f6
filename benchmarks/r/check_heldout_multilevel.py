#!/usr/bin/env python3
"""Sanity check of tests/data/heldout/multilevel: data, formulas, split columns, and the two references.

usage (from the repo root): python benchmarks/r/check_heldout_multilevel.py [--refs]
For every row of cases.tsv: the CSV reads with pandas, every name in the formula is a column, and per
grouping factor the number of levels and the largest number of sites (levels of `split`) one level
occurs at. A factor is `local` when each of its levels lives at one site, `shared` otherwise.
Rules checked: a nested case (all factors local) must have a split; a shared-factor case must share at
least one factor; a case with an empty split must have factors that no grouping column nests.
--refs adds lme4's and glmmTMB's log-likelihoods, their difference, singular flags, messages and times.
Exit status 1 when a rule fails.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd

D = Path(__file__).resolve().parents[2] / "tests" / "data" / "heldout" / "multilevel"
FUNCS = {"cbind", "offset", "log", "exp", "I", "sqrt"}
SHARED_CASES = ("verbagg", "scotssec", "insteval", "sim_teachers", "sim_doctors", "sim_items_pois")


def bars(formula: str) -> list[tuple[str, str]]:
    """(left side, grouping expression) of every (... | g) / (... || g) term."""
    return [(m.group(1).strip(), m.group(3).strip())
            for m in re.finditer(r"\(([^()|]*?)(\|\|?)([^()|]+)\)", formula)]


def factors(group: str) -> list[tuple[str, ...]]:
    """lme4's expansion of a grouping expression: a/b -> a, a:b; a:b -> (a, b)."""
    parts = [p.strip() for p in group.split("/")]
    out = []
    for i in range(len(parts)):
        cols = []
        for p in parts[: i + 1]:
            cols += [c.strip() for c in p.split(":")]
        out.append(tuple(cols))
    return out


def names(formula: str) -> set[str]:
    toks = set(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", formula))
    return toks - FUNCS


def key(df: pd.DataFrame, cols: tuple[str, ...]) -> pd.Series:
    return df[list(cols)].astype(str).agg(":".join, axis=1) if len(cols) > 1 else df[cols[0]].astype(str)


def sites_per_level(df, cols, split) -> int:
    return int(pd.DataFrame({"g": key(df, cols), "s": df[split].astype(str)}).groupby("g")["s"].nunique().max())


def main(refs: bool) -> int:
    tab = pd.read_csv(D / "cases.tsv", sep="\t", dtype=str, keep_default_na=False)
    tab.columns = [c.lstrip("# ") for c in tab.columns]
    bad = []
    rows = []
    for _, c in tab.iterrows():
        df = pd.read_csv(D / f"{c['data']}.csv")
        missing = sorted(n for n in names(c["formula"]) if n not in df.columns)
        if c["weights"] and c["weights"] not in df.columns:
            missing.append(c["weights"])
        if c["split"] and c["split"] not in df.columns:
            missing.append(c["split"])
        facs = []
        for _, g in bars(c["formula"]):
            for f in factors(g):
                if f not in facs:
                    facs.append(f)
        desc, kinds = [], []
        for f in facs:
            nlev = key(df, f).nunique()
            if c["split"]:
                k = sites_per_level(df, f, c["split"])
                kind = "local" if k == 1 else "shared"
                kinds.append(kind)
                if kind == "shared":
                    share = pd.DataFrame({"g": key(df, f), "s": df[c["split"]]}).groupby("g")["s"].nunique()
                    desc.append(f"{':'.join(f)}={nlev} shared(max {k} sites, {(share > 1).mean():.0%} of levels >1)")
                else:
                    desc.append(f"{':'.join(f)}={nlev} local")
            else:
                desc.append(f"{':'.join(f)}={nlev}")
        if c["split"]:
            nsite = df[c["split"]].nunique()
            is_shared_case = c["name"].startswith(SHARED_CASES)
            kind = "shared" if "shared" in kinds else "nested"
            if is_shared_case != (kind == "shared"):
                bad.append(f"{c['name']}: expected {'shared' if is_shared_case else 'nested'}, found {kind}")
        else:
            nsite = 0
            kind = "crossed"
            # no grouping column nests every factor: each factor's levels meet several levels of another
            for f in facs:
                others = [g for g in facs if g != f]
                if others and all(sites_per_level(df, g, f[0]) == 1 for g in others) and \
                        all(sites_per_level(df, f, g[0]) == 1 for g in others):
                    bad.append(f"{c['name']}: empty split but {f} nests the others")
        if missing:
            bad.append(f"{c['name']}: missing columns {missing}")
        row = {"case": c["name"], "rows": len(df), "family": c["family"], "split": c["split"] or "-",
               "sites": nsite, "kind": kind, "factors": "; ".join(desc), "cols": "ok" if not missing else "MISSING"}
        if refs:
            a = json.loads((D / f"{c['name']}.json").read_text())
            b = json.loads((D / f"{c['name']}.tmb.json").read_text())
            la, lb = a["logLik"], b["logLik"]
            comparable = a.get("loglik_comparable", True)
            row.update({
                "ll_lme4": round(la, 4), "ll_tmb": round(lb, 4),
                "diff": round(lb - la, 4),
                "better": ("tmb (lme4 not comparable)" if not comparable else
                           "tie" if abs(lb - la) < 1e-3 else ("tmb" if lb > la else "lme4")),
                "sing": "lme4" if a.get("singular") else "",
                "dfix": round(max(abs(a["fixef"][k] - b["fixef"][k]) for k in a["fixef"]), 4),
                "msg_lme4": len(a.get("messages") or []), "msg_tmb": len(b.get("messages") or []),
                "pdHess": b.get("pdHess"), "t_lme4": round(a["seconds"], 2), "t_tmb": round(b["seconds"], 2),
            })
        rows.append(row)
    out = pd.DataFrame(rows)
    struct = ["case", "rows", "family", "split", "sites", "kind", "factors", "cols"]
    with pd.option_context("display.width", 250, "display.max_colwidth", 90, "display.max_rows", 200):
        print(out[struct].to_string(index=False))
        if refs:
            print()
            print(out[["case"] + [c for c in out.columns if c not in struct]].to_string(index=False))
    for b in bad:
        print("FAIL", b)
    print(f"{len(out)} cases, {out['rows'].sum()} rows in all, {len(bad)} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main("--refs" in sys.argv))
