"""The golden file: every reference case fitted by every method, recorded to guard refactors.

``tests/data/golden.json`` holds, for each reference case (``tests/data/shared_cases.tsv`` and
``tests/data/extra_cases.tsv``) and each variant (method, pooled or split over sites, options), the
estimates, standard errors, θ, variance components, logLik, conditional modes, rounds and bytes, or the
one-line error the fit ended with.  ``tests/test_golden.py`` refits everything and compares (its docstring
gives the tolerances: values to 1e-9 relative to max(1, |value|), rounds and messages exactly).

The file changes only on purpose: ``python tests/golden.py --write`` rewrites it, and the commit that does
so says why the numbers moved (``--write cbpp_olre/`` rewrites only the fits whose key starts so).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden.json"

# (label, method, split over 3 sites, extra options)
VARIANTS = [
    ("iterative", "iterative", False, {}),
    ("iterative_3", "iterative", True, {}),
    ("hybrid", "hybrid", False, {}),
    ("hybrid_3", "hybrid", True, {}),
    ("hybrid_3_rules", "hybrid", True, {"site_config": "rules"}),
    ("oneshot_3_k2", "oneshot", True, {"min_group": 1, "moments": 2}),
    ("oneshot_3", "oneshot", True, {}),
]
EXTRA = [   # a few option paths the variants above do not reach
    ("cbpp_la", "penalty_iterative", "iterative", False, {"penalty": 1.0}),
    ("sim_logit_uncorr", "penalty_hybrid_3", "hybrid", True, {"penalty": 2.0}),
    ("cbpp_probit", "expected_curvature", "iterative", False, {"curvature": "expected"}),
    ("contraception_la", "hybrid_3_k3", "hybrid", True, {"moments": 3}),
]


def cases() -> list[dict]:
    out = []
    for table in ("shared_cases.tsv", "extra_cases.tsv"):
        tab = pd.read_csv(DATA / table, sep="\t", dtype=str, keep_default_na=False)
        tab.columns = [c.lstrip("# ") for c in tab.columns]
        for _, row in tab.iterrows():
            fam, _, link = row["family"].partition("/")
            link = link or row.get("link") or None
            data = row["data"] if table == "shared_cases.tsv" else row["data"]
            out.append({"name": row["name"], "data": DATA / f"{data}.csv", "formula": row["formula"],
                        "family": fam, "link": link, "nagq": max(int(row["nagq"]), 1),
                        "reml": row["reml"] == "1", "weights": row.get("weights") or None})
    return out


def _split(df: pd.DataFrame, formula: str, k: int = 3) -> dict:
    """k sites, by the codes of the first grouping column (rows by position for a GLM)."""
    import re

    groups = re.findall(r"\|\|?\s*([A-Za-z_.][\w.]*)\s*\)", formula)
    codes = pd.factorize(df[groups[-1]])[0] if groups else np.arange(len(df))
    return {f"s{i}": df[codes % k == i].reset_index(drop=True) for i in range(k)}


def _floats(x) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, float).ravel()]


def record(res) -> dict:
    out = {"loglik": float(res.loglik), "fixef": _floats(res.fixef), "names": list(map(str, res.fixef.index)),
           "se": _floats(res.se), "theta": _floats(res.theta if res.theta is not None else []),
           "random": _floats([r.get("sd", r.get("corr")) for r in res.random]),
           "residual_sd": None if res.residual_sd is None else float(res.residual_sd),
           "rounds": int(res.rounds), "bytes_to_sites": int(res.bytes_to_sites),
           "bytes_from_sites": int(res.bytes_from_sites), "converged": bool(res.converged),
           "method": res.method, "messages": list(res.messages)}
    if res.modes is not None:
        modes, condsd = res.ranef(condvar=True)
        if isinstance(modes, dict):         # several grouping factors: each factor's levels as factor/level
            out["levels"] = [f"{g}/{lv}" for g, m in modes.items() for lv in m.index]
            out["modes"] = [v for m in modes.values() for v in _floats(m.to_numpy())]
            out["condsd"] = [v for m in condsd.values() for v in _floats(m.to_numpy())]
        else:
            out["levels"] = list(map(str, modes.index))
            out["modes"] = _floats(modes.to_numpy())
            out["condsd"] = _floats(condsd.to_numpy())
    return out


def run(case: dict, method: str, split: bool, opts: dict) -> dict:
    import fedglmm
    from fedglmm.errors import FedGLMMError

    opts = dict(opts)
    if opts.get("site_config") == "rules":
        from fedglmm.site import SiteConfig

        opts["site_config"] = SiteConfig(min_rows=10, min_cell=0, min_group=20)
    df = pd.read_csv(case["data"])
    data = _split(df, case["formula"]) if split else df
    kw = {} if not case["weights"] else {"weights": case["weights"]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fedglmm.fit(case["formula"], data, family=case["family"], link=case["link"], nagq=case["nagq"],
                              reml=case["reml"], method=method, **kw, **opts)
    except (FedGLMMError, TypeError) as exc:      # the message, not the class: refactors may refine classes
        return {"error": str(exc)}
    return record(res)


def runs():
    """(key, case, method, split, options) for every recorded fit."""
    all_cases = cases()
    by_name = {c["name"]: c for c in all_cases}
    for c in all_cases:
        for label, method, split, opts in VARIANTS:
            yield f"{c['name']}/{label}", c, method, split, opts
    for name, label, method, split, opts in EXTRA:
        yield f"{name}/{label}", by_name[name], method, split, opts


def write(prefixes: list[str]) -> None:
    """Refit and record the fits whose key starts with one of ``prefixes`` (all of them if none)."""
    out = json.loads(GOLDEN.read_text()) if GOLDEN.exists() and prefixes else {}
    keys = set()
    for key, case, method, split, opts in runs():
        keys.add(key)
        if prefixes and not any(key.startswith(p) for p in prefixes):
            continue
        out[key] = run(case, method, split, opts)
        print(key, out[key].get("error", out[key].get("loglik")), flush=True)
    out = {k: v for k, v in out.items() if k in keys}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


VALUES = ("loglik", "residual_sd", "fixef", "se", "theta", "random", "modes", "condsd")
EXACT = ("rounds", "bytes_to_sites", "bytes_from_sites", "converged", "method", "messages", "names", "levels")


def deviation(got: dict, want: dict) -> tuple[float, list[str]]:
    """The largest relative deviation of any value (relative to max(1, |recorded|)) and the exact fields
    that differ."""
    if "error" in want or "error" in got:
        return 0.0, ([] if got.get("error") == want.get("error") else ["error"])
    worst = 0.0
    for field in VALUES:
        a, b = got.get(field), want.get(field)
        a, b = ([a], [b]) if not isinstance(a, list) else (a, b or [])
        if len(a) != len(b):
            return np.inf, [field]
        for x, y in zip(a, b):
            if (x is None) != (y is None):
                return np.inf, [field]
            if x is not None:
                worst = max(worst, abs(x - y) / max(1.0, abs(y)))
    return worst, [f for f in EXACT if got.get(f) != want.get(f)]


def compare(prefixes: list[str]) -> None:
    """Refit and print, per fit, the largest relative deviation from the golden file and the exact fields
    that moved (nothing is written); the last line is the largest deviation over all fits."""
    recorded = json.loads(GOLDEN.read_text())
    worst = 0.0
    for key, case, method, split, opts in runs():
        if prefixes and not any(key.startswith(p) for p in prefixes):
            continue
        dev, moved = deviation(run(case, method, split, opts), recorded[key])
        worst = max(worst, dev)
        print(f"{key}\t{dev:.2e}\t{','.join(moved)}", flush=True)
    print(f"largest relative deviation: {worst:.2e}")


if __name__ == "__main__":
    if sys.argv[1:2] not in (["--write"], ["--compare"]):
        sys.exit("usage: python tests/golden.py --write [KEY_PREFIX ...]   (rewrites tests/data/golden.json: "
                 "all fits, or those whose key starts with a prefix, e.g. cbpp_olre/)\n"
                 "       python tests/golden.py --compare [KEY_PREFIX ...] (prints each fit's largest relative "
                 "deviation from it and the exact fields that moved; writes nothing)")
    (write if sys.argv[1] == "--write" else compare)(sys.argv[2:])
