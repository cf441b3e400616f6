"""The held-out group `data` (tests/data/heldout/data): formula transforms and missing values, with lme4 and
glmmTMB references, and the parity rules of the reference README (logLik at least the better reference's
− 1e-4, every fixed effect within 0.1 SE of a reference, SEs and random-effect SDs within 5 %)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from reference import full_loglik, r_name, ref_sds

HELDOUT = Path(__file__).parent / "data" / "heldout" / "data"


def cases() -> dict[str, dict]:
    tab = pd.read_csv(HELDOUT / "cases.tsv", sep="\t", dtype=str, keep_default_na=False)
    tab.columns = [c.lstrip("# ") for c in tab.columns]
    out = {}
    for _, row in tab.iterrows():
        refs = [json.loads((HELDOUT / f"{row['name']}{ext}").read_text()) for ext in (".json", ".tmb.json")
                if (HELDOUT / f"{row['name']}{ext}").exists()]
        out[row["name"]] = {"name": row["name"], "data": HELDOUT / f"{row['data']}.csv", "formula": row["formula"],
                            "family": row["family"], "link": None, "nagq": max(int(row["nagq"]), 1),
                            "reml": row["reml"] == "1", "split": row["split"], "refs": refs}
    return out


def split(df: pd.DataFrame, column: str, k: int) -> dict[str, pd.DataFrame]:
    """k sites by the codes of ``column`` (rows whose value is missing go to the last site)."""
    codes = pd.factorize(df[column])[0]
    return {f"s{i}": df[codes % k == i] for i in range(k)}


def check_parity(res, case: dict) -> None:
    """The reference README's parity rules against lme4 / glmmTMB (names mapped as tests/reference.py)."""
    refs = case["refs"]
    assert res.converged
    best = max(full_loglik(r, case) for r in refs)
    assert res.loglik >= best - 1e-4, (res.loglik, best)
    for name, est in res.fixef.items():
        rn = r_name(name)
        dist = [abs(est - r["fixef"][rn]) / r["se"][rn] for r in refs if rn in r.get("fixef", {})]
        assert dist and min(dist) <= 0.1, (name, dist)
        ses = [r["se"][rn] for r in refs if rn in r.get("se", {})]
        assert min(abs(res.se[name] - s) / s for s in ses) <= 0.05, (name, res.se[name], ses)
    ours = [r["sd"] for r in res.random if "sd" in r] + ([res.residual_sd] if res.residual_sd is not None else [])
    for i, sd in enumerate(ours):
        cand = [ref_sds(r)[i] for r in refs if len(ref_sds(r)) == len(ours)]
        assert cand and min(abs(sd - c) / c for c in cand) <= 0.05, (i, sd, cand)


def assert_same_fit(a, b, tol=1e-8, se_rtol=None) -> None:
    """Two fits of the same model: estimates, SDs and logLik to ``tol`` (relative to max(1, |value|)); SEs
    too, or to the relative ``se_rtol`` (the hybrid's SEs come from the Hessian at its last point, moved to
    the estimate: they agree across splits to a relative 1e-4, see tests/test_sites.py)."""
    def close(x, y):
        x, y = np.asarray(x, float), np.asarray(y, float)
        return np.all(np.abs(x - y) <= tol * np.maximum(1.0, np.abs(y)))

    assert list(a.fixef.index) == list(b.fixef.index)
    assert close(a.fixef, b.fixef), (a.fixef - b.fixef)
    if se_rtol is None:
        assert close(a.se, b.se)
    else:
        assert np.allclose(a.se, b.se, rtol=se_rtol, atol=0)
    assert close(a.loglik, b.loglik), (a.loglik, b.loglik)
    assert close([r.get("sd", r.get("corr")) for r in a.random], [r.get("sd", r.get("corr")) for r in b.random])
