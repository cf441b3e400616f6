#!/usr/bin/env python3
"""Negative binomial, Gamma and prior weights: parity with glmmTMB, rounds, splits and ψ-derivatives.

usage: python3 benchmarks/parity_families.py [--only REGEX] [--sites K | --per-level]

For the shared cases ``sleepstudy_gamma``, ``grouseticks_nb``, ``cbpp_prop`` and the held-out cases of
tests/data/heldout/families/ (references: glmmTMB for NB and Gamma, glmmTMB and lme4 otherwise; see
tests/test_families_parity.py) it fits the pooled rows with the default (hybrid) and the iterative
method and prints per case:

* ``conv``, ``hyb``, ``iter``: converged (hybrid), rounds of each method;
* ``ΔlogLik``: logLik minus the reference's (must be ≥ −1e-4);
* ``β/SE``: the largest |β − β_ref| / SE_ref (must be ≤ 0.1);
* ``SE``, ``SD``, ``disp``: the largest relative difference of the standard errors, of the random-effect
  (and residual) SDs, of the dispersion (θ for NB, σ for Gamma) from the reference's (each ≤ 0.05);
* ``split h``, ``split i``: the rows split over K sites by the case's split column (site = level code mod
  K; ``--per-level``: one site per level), hybrid and iterative: the largest relative difference of the
  estimates, SDs, dispersion and logLik from the pooled fit of the same method (must be ≤ 1e-8), and
  (``sites``, ``rnd``) the number of sites and the split hybrid fit's rounds;
* ``dψ``: at the pooled estimate, the largest relative difference between the engine's analytic
  derivatives with respect to ψ (the gradient's entry and the Hessian's row) and central differences of
  its value and gradient (NB and Gamma only).

Then the proportion fits against their ``cbind`` twins (cbpp_prop against cbpp's cbind fit,
sim_binom_prop against sim_binom_cbind): the largest relative difference (must be ≤ 1e-8).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import r_name, ref_sds  # noqa: E402
from test_families_parity import CASES, DISPERSION, _data, _fit  # noqa: E402

import fedglmm  # noqa: E402

SPLIT = {"sleepstudy_gamma": "Subject", "grouseticks_nb": "LOCATION", "cbpp_prop": "herd"}


def _rel(a, b) -> float:
    return float(abs(a - b) / abs(b))


def criteria(res, case) -> dict:
    """The judged figures against the case's references (the best reference for each)."""
    refs = case["refs"]
    out = {"dll": res.loglik - max(r["logLik"] for r in refs), "beta": 0.0, "se": 0.0, "sd": 0.0, "disp": np.nan}
    for term, est in res.fixef.items():
        rn = r_name(term)
        out["beta"] = max(out["beta"], min(abs(est - r["fixef"][rn]) / r["se"][rn] for r in refs))
        out["se"] = max(out["se"], min(_rel(res.se[term], r["se"][rn]) for r in refs))
    ours = [r["sd"] for r in res.random if "sd" in r] + ([res.residual_sd] if res.residual_sd is not None else [])
    for i, sd in enumerate(ours):
        out["sd"] = max(out["sd"], min(_rel(sd, ref_sds(r)[i]) for r in refs if len(ref_sds(r)) == len(ours)))
    if case["family"] == "negative_binomial":
        out["disp"] = _rel(res.dispersion["theta"], refs[0]["nb_theta"])
    elif case["family"] == "gamma":
        out["disp"] = _rel(res.dispersion["sigma"], refs[0]["gamma_sigma"])
    return out


def _vector(res) -> np.ndarray:
    disp = [next(iter(res.dispersion.values()))] if res.dispersion else []
    return np.r_[res.fixef.to_numpy(), [r.get("sd", r.get("corr")) for r in res.random],
                 res.residual_sd or 0.0, disp, res.loglik]


def difference(a, b) -> float:
    x, y = _vector(a), _vector(b)
    return float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y))))


def split(df: pd.DataFrame, column: str, k: int | None) -> dict:
    codes = pd.factorize(df[column])[0]
    k = k or int(codes.max()) + 1
    return {f"s{i}": df[codes % k == i].reset_index(drop=True) for i in range(k) if np.any(codes % k == i)}


def dispersion_fd(case) -> float:
    """max relative error of ∂ℓ/∂ψ and of the Hessian's ψ row against central differences at the estimate."""
    from fedglmm.likelihood.engine import make_engine
    from fedglmm.likelihood.fit import LocalEvaluator, fit_glmm
    from fedglmm.likelihood.setup import make_setup, setup_reply
    from fedglmm.likelihood.starts import start_values
    from fedglmm.model.design import build_design, describe_frame
    from fedglmm.model.families import get_family
    from fedglmm.model.formula import parse_formula, variables
    from fedglmm.model.options import FitOptions
    from fedglmm.model.spec import Schema

    fam = get_family(case["family"], case["link"])
    spec = parse_formula(case["formula"]).with_columns(case["weights"], None)
    frame = _data(case)
    desc = describe_frame(frame, spec, "s")
    schema = Schema(kinds={c: desc["columns"][c] for c in variables(spec)}, levels=dict(desc["levels"]))
    design = build_design(spec, schema, frame, fam, "s", checked=True)
    st = make_setup({"s": setup_reply(design, fam)}, fam.ndisp)
    eng = make_engine(design, fam, 1, "observed", st.A, st.zs)
    est = fit_glmm(LocalEvaluator({"s": eng}, {"s": design.group_levels}), st, *start_values(st, fam),
                   FitOptions())
    x = np.r_[est.gamma, est.theta, est.disp]
    s = eng.sums(x)
    h = 1e-5
    e = np.zeros_like(x)
    e[-1] = h
    hi, lo = eng.sums(x + e), eng.sums(x - e)
    fd_g = (hi["value"] - lo["value"]) / (2 * h)
    fd_row = (hi["grad"] - lo["grad"]) / (2 * h)
    err_g = abs(s["grad"][-1] - fd_g) / max(1.0, abs(fd_g))
    err_h = float(np.max(np.abs(s["hess"][-1] - fd_row) / np.maximum(1.0, np.abs(fd_row))))
    return max(err_g, err_h)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--per-level", action="store_true")
    args = ap.parse_args()
    k = None if args.per_level else args.sites
    warnings.simplefilter("ignore")
    print(f"{'case':22s} {'family':18s} {'conv':>4s} {'hyb':>3s} {'iter':>4s} {'ΔlogLik':>9s} {'β/SE':>7s} "
          f"{'SE':>7s} {'SD':>7s} {'disp':>7s} {'split h':>8s} {'split i':>8s} {'sites':>5s} {'rnd':>3s} {'dψ':>8s} "
          f"{'sec':>5s}")
    bad = 0
    fits = {}
    for name, case in CASES.items():
        if args.only and not re.search(args.only, name):
            continue
        t0 = time.perf_counter()
        res = _fit(case)
        sec = time.perf_counter() - t0
        it = _fit(case, method="iterative")
        fits[name] = res
        c = criteria(res, case)
        column = case.get("split") or SPLIT.get(name)
        df = _data(case)
        parts = split(df, column, k)
        hs = _fit(case, parts)
        sh = difference(hs, res)
        si = difference(_fit(case, parts, method="iterative"), it)
        dpsi = dispersion_fd(case) if case["family"] in DISPERSION else np.nan
        fam = case["family"] + (f"/{case['link']}" if case["link"] else "") + (" w" if case["weights"] else "")
        ok = (res.converged and res.rounds <= 10 and hs.rounds <= 10 and c["dll"] >= -1e-4 and c["beta"] <= 0.1 and c["se"] <= 0.05
              and c["sd"] <= 0.05 and not c["disp"] > 0.05 and sh <= 1e-8 and si <= 1e-8 and not dpsi > 1e-5)
        bad += not ok
        print(f"{name:22s} {fam:18s} {'yes' if res.converged else 'NO':>4s} {res.rounds:3d} {it.rounds:4d} "
              f"{c['dll']:9.1e} {c['beta']:7.1e} {c['se']:7.1e} {c['sd']:7.1e} {c['disp']:7.1e} {sh:8.1e} "
              f"{si:8.1e} {len(parts):5d} {hs.rounds:3d} {dpsi:8.1e} {sec:5.1f}{'' if ok else '  FAILS'}")
    twins = [("cbpp_prop", None), ("sim_binom_prop", "sim_binom_cbind")]
    for prop, cbind in twins:
        if prop not in fits:
            continue
        if cbind is None:          # cbpp in its cbind form
            df = pd.read_csv(CASES[prop]["data"])
            twin = fedglmm.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", df, family="binomial")
        else:
            twin = _fit(CASES[cbind])
        d = difference(fits[prop], twin)
        bad += d > 1e-8
        print(f"{prop} = cbind twin: largest relative difference {d:.1e}")
    print(f"{bad} case(s) fail a criterion")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
