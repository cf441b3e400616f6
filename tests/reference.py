"""Load the lme4 / glmmTMB reference fits of tests/data and map their names to fedglmm's; read the held-out case
tables (tests/data/heldout) and the better reference logLik of each case."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pandas as pd

DATA = Path(__file__).parent / "data"


def r_name(name: str) -> str:
    """fedglmm / formulaic column name → lme4's: Intercept → (Intercept), f[T.b] → fb, ** → ^."""
    if name == "Intercept":
        return "(Intercept)"
    name = re.sub(r"\[T\.([^\]]*)\]", r"\1", name)
    return name.replace(" ** ", "^")


def cases() -> list[dict]:
    """Every reference case: public (cases.tsv) and extra (extra_cases.tsv), with their references."""
    out = []
    for table, prefix in (("cases.tsv", ""), ("extra_cases.tsv", "extra_")):
        tab = pd.read_csv(DATA / table, sep="\t", dtype=str)
        tab.columns = [c.lstrip("# ") for c in tab.columns]
        for _, row in tab.iterrows():
            name = row["name"]
            base = DATA / "lme4" / name if not prefix else DATA / f"extra_{name}"
            refs = [json.loads(Path(f"{base}.json").read_text())]
            for extra in (".tmb.json", ".refit.json"):
                if Path(f"{base}{extra}").exists():
                    refs.append(json.loads(Path(f"{base}{extra}").read_text()))
            nagq = int(row["nagq"])
            out.append({"name": name, "data": DATA / f"{row['data']}.csv", "formula": row["formula"],
                        "family": row["family"], "link": row.get("link") if isinstance(row.get("link"), str) else None,
                        "nagq": max(nagq, 1), "reml": row["reml"] == "1", "refs": refs})
    return out


def saturated_loglik(case: dict) -> float:
    """Σ log f(y | μ = y), computed from the data with scipy (binomial: cbind or 0/1; poisson)."""
    from scipy import stats

    from fedglmm.model.formula import parse_formula

    d = pd.read_csv(case["data"])
    spec = parse_formula(case["formula"])
    y = d.eval(spec.response).to_numpy(float)
    if case["family"] == "poisson":
        return float(stats.poisson.logpmf(y, y).sum())
    m = y + d.eval(spec.failures).to_numpy(float) if spec.failures else 1.0 + 0 * y
    return float(stats.binom.logpmf(y, m, y / m).sum())


def full_loglik(ref: dict, case: dict) -> float:
    """The reference's full log-likelihood (lme4's nAGQ > 1 value lacks the saturated part)."""
    if "logLik_full" in ref:
        return ref["logLik_full"]
    if case["nagq"] > 1 and ref.get("engine", "").startswith("lme4"):
        return ref["logLik"] + saturated_loglik(case)
    return ref["logLik"]


def ref_sds(ref: dict) -> list[float]:
    """Random-effect SDs (then residual SD) in lme4's order, from either engine's JSON."""
    if "varcorr" in ref:
        return [v["sdcor"] for v in ref["varcorr"] if "var2" not in v or v.get("var2") is None]
    sd = []
    for v in ref.get("sd", {}).values():
        sd.extend(v if isinstance(v, list) else [v])
    return sd


def read_cases(path: Path) -> list[dict]:
    """The cases of a held-out case table (tests/data/heldout/*/cases.tsv): data, formula, family and link, nAGQ,
    REML, the split column and weights."""
    tab = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    tab.columns = [c.lstrip("# ") for c in tab.columns]
    out = []
    for _, row in tab.iterrows():
        fam, _, link = row["family"].partition("/")
        out.append({"name": row["name"], "dir": path.parent, "data": path.parent / f"{row['data']}.csv",
                    "formula": row["formula"], "family": fam, "link": link or None,
                    "nagq": max(int(row["nagq"]), 1), "reml": row.get("reml") == "1",
                    "split": row.get("split", ""), "weights": row.get("weights") or None})
    return out


def best_reference(case: dict) -> float | None:
    """The better full logLik of lme4 and glmmTMB (None if neither file is there); for the negative binomial
    and Gamma glmmTMB's alone, as in tests/test_families_parity.py: lme4's glmer.nb and Gamma logLiks are
    not the maximum-likelihood objective's (Gamma: its dispersion is a moment estimate).  lme4's nAGQ > 1 logLik
    is the one at its estimates with the modes converged where the case's directory has it (aghq_at_lme4.tsv: the
    value lme4 reports is its last evaluation, modes to tolPwrss 1e-7, and toenail's by nAGQ 20 is 1.9e-4 too
    high).  tests/test_rounds.py and benchmarks/rounds_heldout.py hold fits to it."""
    tight = _converged_lme4(case["dir"])
    vals = []
    for suffix in (".tmb.json",) if case["family"] in ("negative_binomial", "gamma") else (".json", ".tmb.json"):
        f = case["dir"] / f"{case['name']}{suffix}"
        if f.exists():
            ref = json.loads(f.read_text())
            if suffix == ".json" and case["name"] in tight:
                ref = dict(ref, logLik=float(tight[case["name"]]))
            vals.append(full_loglik(ref, case))
    return max(vals) if vals else None


@functools.lru_cache(maxsize=None)
def _converged_lme4(directory: Path) -> dict:
    """lme4's nAGQ > 1 logLiks at its estimates with the modes converged, by case (aghq_at_lme4.tsv), read once."""
    f = directory / "aghq_at_lme4.tsv"
    return pd.read_csv(f, sep="\t").set_index("name")["logLik_tol1e-10"].to_dict() if f.exists() else {}
