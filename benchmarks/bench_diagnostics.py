"""Calibration and power of the diagnostics round (randomized quantile residuals with posterior draws of
the random effects; see fedglmm.site.diagnostics).

For each model below: fit it to its data, simulate R data sets from the fitted model (new random effects
from the fitted covariance, new outcomes; numpy default_rng(20240901 + case index)), refit each over 3
sites with the diagnostics round, and count how often the uniformity test and the dispersion test reject
at 1 %.  Under the model both should reject in about 1 % of the replicates; the acceptance criterion is
that the uniformity test does not reject in at least 95 of 100.  The last row simulates poisson data with
real overdispersion (gamma-poisson given the random effect, shape 2) and counts how often the dispersion
test detects it (power).

    python3 benchmarks/bench_diagnostics.py               # 100 replicates per model (~3-5 minutes)
    python3 benchmarks/bench_diagnostics.py --reps 20     # quicker
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.model.design import new_data_matrices

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CASES = [
    ("sleepstudy (gaussian, random slope)", "sleepstudy.csv", "Reaction ~ Days + (Days | Subject)", "gaussian",
     "Subject", None),
    ("contraception (binomial, random slope)", "contraception.csv", "use ~ urban + age + livch + (urban | district)",
     "binomial", "district", None),
    ("cbpp (binomial with trials)", "cbpp.csv", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
     "binomial", "herd", "size"),
    ("sim_pois_offset (poisson, offset)", "extra_sim_pois_offset.csv", "y ~ x + offset(log(t)) + (1 | g)",
     "poisson", "g", None),
]


def simulate(res, d: pd.DataFrame, rng, trials_col, overdispersion=0.0) -> pd.DataFrame:
    """One data set from the fitted model: the same covariates and groups, new effects and outcomes."""
    X, Z, off, groups = new_data_matrices(res.spec, res.schema, d, need_group=True)
    if isinstance(groups, dict):
        groups = groups[res.group_name]
    levels, code = np.unique(groups.astype(str), return_inverse=True)
    cov = res.cov_re.to_numpy()
    b = rng.multivariate_normal(np.zeros(len(cov)), cov, size=len(levels))
    eta = X @ res.fixef.to_numpy() + off + np.sum(Z * b[code], axis=1)
    out = d.copy()
    resp = res.spec.response
    if res.family.name == "gaussian":
        out[resp] = eta + res.residual_sd * rng.normal(size=len(eta))
    elif res.family.name == "poisson":
        mu = np.exp(eta)
        if overdispersion:
            mu = rng.gamma(1.0 / overdispersion, mu * overdispersion)
        out[resp] = rng.poisson(mu)
    else:
        m = d[trials_col].to_numpy() if trials_col else np.ones(len(eta), int)
        out[resp] = rng.binomial(m, 1.0 / (1.0 + np.exp(-eta)))
    return out


def run_case(i, label, file, formula, family, group, trials, reps, od=0.0):
    d = pd.read_csv(DATA / file)
    base = fedglmm.fit(formula, d, family=family)
    rng = np.random.default_rng(20240901 + i)
    codes = d[group].astype("category").cat.codes
    rej_u = rej_d = 0
    pu, t0 = [], time.perf_counter()
    for r in range(reps):
        sim = simulate(base, d, rng, trials, od)
        sites = {f"s{k}": sim[codes % 3 == k] for k in range(3)}
        res = fedglmm.fit(formula, sites, family=family, diagnostics=True, seed=r)
        u = res.diagnostics.uniformity()["p_value"]
        disp = res.diagnostics.dispersion()
        pu.append(u)
        rej_u += u < 0.01
        rej_d += disp is not None and disp["p_value"] < 0.01
    secs = (time.perf_counter() - t0) / reps
    return label, reps, reps - rej_u, rej_d if family != "gaussian" else None, float(np.mean(pu)), secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = [run_case(i, *c, reps=args.reps) for i, c in enumerate(CASES)]
    rows.append(run_case(len(CASES), "sim_pois_offset, overdispersed (power)", *CASES[3][1:], reps=args.reps,
                         od=0.5))
    print(f"{'model':44s} {'reps':>5s} {'uniform: not rejected':>22s} {'dispersion: rejected':>21s} "
          f"{'mean p':>7s} {'s/fit':>6s}")
    for label, reps, ok, disp, mp, secs in rows:
        dtxt = "-" if disp is None else f"{disp}/{reps}"
        print(f"{label:44s} {reps:5d} {f'{ok}/{reps}':>22s} {dtxt:>21s} {mp:7.3f} {secs:6.2f}")


if __name__ == "__main__":
    main()
