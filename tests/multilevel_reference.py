"""The multi-level reference cases (several grouping factors) and how a fit is compared with them.

Cases: the multi-level rows of ``tests/data/shared_cases.tsv`` (references in ``tests/data/lme4/``) and
the held-out set ``tests/data/heldout/multilevel/`` (its README: compare logLik with glmmTMB's, since lme4
misreports it on observation-level cases; match variance components by group name and term, not by
position; ``(x || g)`` shows in lme4 as groups ``g`` and ``g.1``).

The criteria (issue 11): converged; logLik ≥ the better comparable reference − 1e-4; every fixed effect
within 0.1 SE of a reference; every SE and every random-effect SD (and the residual SD) within 5 % of a
reference (an SD that is zero in a reference -- a singular fit -- within 5e-3 of it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).parent / "data"
HELDOUT = DATA / "heldout" / "multilevel"
SHARED = ("grouseticks_nested", "grouseticks_olre", "cbpp_olre", "penicillin_crossed", "penicillin_crossed_ml")
SHARED_SPLIT = {"grouseticks_nested": "LOCATION", "grouseticks_olre": "LOCATION", "cbpp_olre": "herd"}


def r_name(name: str) -> str:
    """fedglmm's column name → lme4's: Intercept → (Intercept), f[T.b] → fb, ** → ^."""
    if name == "Intercept":
        return "(Intercept)"
    return re.sub(r"\[T\.([^\]]*)\]", r"\1", name).replace(" ** ", "^")


def _numbers(ref: dict) -> dict:
    """A reference with its non-numeric entries (glmmTMB's "NaN" SEs at a singular fit) dropped."""
    for key in ("fixef", "se"):
        ref[key] = {k: v for k, v in ref.get(key, {}).items() if isinstance(v, (int, float)) and np.isfinite(v)}
    return ref


def _row(row, data_dir: Path, ref_dir: Path) -> dict:
    fam, _, link = row["family"].partition("/")
    refs = [_numbers(json.loads(p.read_text()))
            for p in (ref_dir / f"{row['name']}.json", ref_dir / f"{row['name']}.tmb.json") if p.exists()]
    return {"name": row["name"], "data": data_dir / f"{row['data']}.csv", "formula": row["formula"],
            "family": fam, "link": link or None, "reml": row["reml"] == "1", "weights": row.get("weights") or None,
            "split": row.get("split") or None, "refs": refs}


def cases(which: str = "all") -> list[dict]:
    """``shared``, ``heldout`` or ``all`` multi-level cases."""
    out = []
    if which in ("shared", "all"):
        tab = _table(DATA / "shared_cases.tsv")
        for _, row in tab[tab["name"].isin(SHARED)].iterrows():
            case = _row(row, DATA, DATA / "lme4")
            case["split"] = SHARED_SPLIT.get(row["name"])
            out.append(case)
    if which in ("heldout", "all"):
        for _, row in _table(HELDOUT / "cases.tsv").iterrows():
            out.append(_row(row, HELDOUT, HELDOUT))
    return out


def _table(path: Path) -> pd.DataFrame:
    tab = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    tab.columns = [c.lstrip("# ") for c in tab.columns]
    return tab


def fit(case: dict, data=None, **kw):
    """fedglmm's fit of a case (pooled rows unless ``data`` is given)."""
    import fedglmm

    data = pd.read_csv(case["data"]) if data is None else data
    extra = {"weights": case["weights"]} if case["weights"] else {}
    return fedglmm.fit(case["formula"], data, family=case["family"], link=case["link"], reml=case["reml"],
                       **extra, **kw)


def split_sites(case: dict, k: int | None = None) -> dict:
    """The case's rows over sites by its split column: one site per level, or k sites (codes mod k)."""
    df = pd.read_csv(case["data"])
    codes = pd.factorize(df[case["split"]], sort=True)[0]
    k = k or codes.max() + 1
    return {f"s{i}": df[codes % k == i].reset_index(drop=True) for i in range(k) if np.any(codes % k == i)}


def _group(grp: str, ours: set) -> str:
    """lme4's group name as ours: ``patient.1`` (an uncorrelated term) is ``patient``."""
    return grp if grp in ours else re.sub(r"\.\d+$", "", grp)


def ref_sds(ref: dict, ours: set) -> dict:
    """{(group, term): sd} and {(group, term1, term2): corr} of a reference, with the residual SD under
    ('Residual', '')."""
    sds, corr = {}, {}
    for v in ref.get("varcorr", []):
        grp = "Residual" if v["grp"] == "Residual" else _group(v["grp"], ours)
        if v.get("var2"):
            corr[grp, v["var1"], v["var2"]] = v["sdcor"]
        else:
            sds[grp, v.get("var1") or ""] = v["sdcor"]
    return sds, corr


def compare(res, case: dict) -> list[str]:
    """The criteria the fit misses (empty: all met)."""
    bad, refs = [], case["refs"]
    if not res.converged:
        bad.append("not converged")
    lls = [r["logLik"] for r in refs if r.get("loglik_comparable", True) is not False]
    if lls and res.loglik < max(lls) - 1e-4:
        bad.append(f"logLik {res.loglik:.6f} < {max(lls):.6f} - 1e-4")
    for name, est in res.fixef.items():
        rn = r_name(name)
        se = next((r["se"][rn] for r in refs if rn in r["se"]), None)     # glmmTMB has none at a singular fit
        dist = [abs(est - r["fixef"][rn]) / r["se"].get(rn, se) for r in refs if rn in r["fixef"] and se]
        if not dist or min(dist) > 0.1:
            bad.append(f"fixef {name}: {dist}")
        ses = [r["se"][rn] for r in refs if rn in r.get("se", {})]
        if not ses or min(abs(res.se[name] - s) / s for s in ses) > 0.05:
            bad.append(f"se {name}: {res.se[name]:.5g} vs {ses}")
    ours = {r["group"] for r in res.random}
    mine = {(r["group"], r_name(r["term"])): r["sd"] for r in res.random if "sd" in r}
    if res.residual_sd is not None:
        mine["Residual", ""] = res.residual_sd
    theirs = [ref_sds(r, ours)[0] for r in refs]
    for key, sd in mine.items():
        cand = [t[key] for t in theirs if key in t]
        if not cand or min(abs(sd - c) - (0.05 * c if c > 5e-3 else 5e-3) for c in cand) > 0:
            bad.append(f"sd {key}: {sd:.5g} vs {cand}")
    return bad
