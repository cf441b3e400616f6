#!/usr/bin/env python3
"""Negative binomial and Gamma on simulated data of the kinds users have, against glmmTMB and the truth.

usage: python3 benchmarks/sim_families.py [--out DIR] [--sites K] [--no-r]

Simulates (numpy default_rng, fixed seeds; truth in each function's comment):

* ``nb_small_groups``: overdispersed counts, 600 patients with 1–6 visits each (many tiny groups), a
  4-level factor and a covariate, θ = 0.7;
* ``nb_rare``: rare overdispersed events (mean ≈ 0.2, 70 % zeros), 250 wards of 2–12 rows, θ = 0.5;
* ``nb_near_poisson``: θ = 200 (almost no overdispersion: θ is barely identified);
* ``gamma_los_skewed``: lengths of stay, CV 1.1 (shape 0.8), log link, 80 hospitals of 3–400 patients;
* ``gamma_los_slope``: lengths of stay, log link, a random slope of age by hospital, CV 0.7;
* ``gamma_inverse_skewed``: inverse link (R's default), shape 1.2.

writes each data set to DIR (default: a temporary directory), fits glmmTMB on it with
benchmarks/r/ref_glmmtmb.R (unless --no-r), fits fedglmm with the default (hybrid) method pooled and
split over K sites (by group: site = group code mod K), and prints per case: rounds (pooled, split),
ΔlogLik against glmmTMB, the largest |Δβ|/SE, the largest relative difference of the SEs, the SDs and
the dispersion from glmmTMB's, the split fit's largest relative difference from the pooled fit, and the
estimates' distance from the truth (max |β − β_true| / SE; dispersion and SD relative to the truth).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import r_name as _r_name, ref_sds  # noqa: E402

R_SCRIPT = Path(__file__).resolve().parent / "r" / "ref_glmmtmb.R"


def _labels(n, prefix):
    w = len(str(n))
    return np.array([f"{prefix}{i + 1:0{w}d}" for i in range(n)])


def _rnbinom(rng, mu, theta):
    return rng.negative_binomial(theta, theta / (theta + mu))


def nb_small_groups(seed=20261201):
    # 600 groups of U{1..6}; f in A/B/C/D; x ~ N(0,1); eta = 0.3 + (0, .4, -.3, .8)[f] + 0.5 x + b, b ~ N(0, 0.6²);
    # theta = 0.7
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, 600)
    g = np.repeat(np.arange(600), sizes)
    n = len(g)
    f = rng.choice(4, n, p=[0.4, 0.3, 0.2, 0.1])
    x = rng.normal(size=n)
    b = rng.normal(0, 0.6, 600)
    eta = 0.3 + np.array([0, 0.4, -0.3, 0.8])[f] + 0.5 * x + b[g]
    y = _rnbinom(rng, np.exp(eta), 0.7)
    df = pd.DataFrame({"y": y, "f": np.array(list("ABCD"))[f], "x": x.round(4), "g": _labels(600, "p")[g]})
    truth = {"beta": [0.3, 0.4, -0.3, 0.8, 0.5], "sd": [0.6], "theta": 0.7}
    return df, "y ~ f + x + (1 | g)", "negative_binomial", truth


def nb_rare(seed=20261202):
    # 250 wards of U{2..12}; x ~ N(0,1); eta = -1.6 + 0.4 x + b, b ~ N(0, 0.5²); theta = 0.5
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 13, 250)
    g = np.repeat(np.arange(250), sizes)
    x = rng.normal(size=len(g))
    b = rng.normal(0, 0.5, 250)
    y = _rnbinom(rng, np.exp(-1.6 + 0.4 * x + b[g]), 0.5)
    df = pd.DataFrame({"y": y, "x": x.round(4), "ward": _labels(250, "w")[g]})
    return df, "y ~ x + (1 | ward)", "negative_binomial", {"beta": [-1.6, 0.4], "sd": [0.5], "theta": 0.5}


def nb_near_poisson(seed=20261203):
    # 60 groups of 20; eta = 1.0 + 0.3 x + b, b ~ N(0, 0.4²); theta = 200
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(60), 20)
    x = rng.normal(size=len(g))
    b = rng.normal(0, 0.4, 60)
    y = _rnbinom(rng, np.exp(1.0 + 0.3 * x + b[g]), 200.0)
    df = pd.DataFrame({"y": y, "x": x.round(4), "g": _labels(60, "g")[g]})
    return df, "y ~ x + (1 | g)", "negative_binomial", {"beta": [1.0, 0.3], "sd": [0.4], "theta": 200.0}


def _hospitals(rng, k, lo, hi):
    sizes = np.exp(rng.uniform(np.log(lo), np.log(hi), k)).astype(int)
    return np.repeat(np.arange(k), sizes)


def gamma_los_skewed(seed=20261204):
    # 80 hospitals, log-uniform sizes 3..400; age ~ U(20, 90) (per decade in the model as age10), sex F/M,
    # severity low/mid/high (.5/.3/.2); log mu = 1.0 + 0.08 age10 + 0.1 [M] + (0, .4, .9)[sev] + b,
    # b ~ N(0, 0.3²); shape 0.8 (CV 1.118)
    rng = np.random.default_rng(seed)
    h = _hospitals(rng, 80, 3, 400)
    n = len(h)
    age10 = rng.uniform(2.0, 9.0, n).round(2)
    sex = rng.integers(0, 2, n)
    sev = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    b = rng.normal(0, 0.3, 80)
    mu = np.exp(1.0 + 0.08 * age10 + 0.1 * sex + np.array([0, 0.4, 0.9])[sev] + b[h])
    los = rng.gamma(0.8, mu / 0.8).round(3) + 0.001
    df = pd.DataFrame({"los": los, "age10": age10, "sex": np.array(["F", "M"])[sex],
                       "severity": np.array(["high", "low", "mid"])[np.array([1, 2, 0])[sev]],
                       "hospital": _labels(80, "h")[h]})
    # R's alphabetical levels: severity high (reference) / low / mid
    truth = {"beta": [1.9, 0.08, 0.1, -0.9, -0.5], "sd": [0.3], "sigma": 1 / np.sqrt(0.8)}
    return df, "los ~ age10 + sex + severity + (1 | hospital)", "gamma/log", truth


def gamma_los_slope(seed=20261205):
    # 50 hospitals, sizes 10..200; log mu = 1.2 + 0.1 age10c + b0 + b1 age10c, sd(b0) 0.3, sd(b1) 0.1,
    # corr 0.3; shape 2 (CV 0.707); age10c = age/10 - 5
    rng = np.random.default_rng(seed)
    h = _hospitals(rng, 50, 10, 200)
    n = len(h)
    a = rng.uniform(-3.0, 4.0, n).round(2)
    L = np.linalg.cholesky(np.array([[0.09, 0.3 * 0.03], [0.3 * 0.03, 0.01]]))
    b = rng.normal(size=(50, 2)) @ L.T
    mu = np.exp(1.2 + 0.1 * a + b[h, 0] + b[h, 1] * a)
    los = rng.gamma(2.0, mu / 2.0).round(3) + 0.001
    df = pd.DataFrame({"los": los, "age10c": a, "hospital": _labels(50, "h")[h]})
    return df, "los ~ age10c + (age10c | hospital)", "gamma/log", {"beta": [1.2, 0.1], "sd": [0.3, 0.1],
                                                                   "sigma": 1 / np.sqrt(2.0)}


def gamma_inverse_skewed(seed=20261206):
    # 40 hospitals, sizes 5..150; 1/mu = 0.2 + 0.02 x + b, x ~ U(0, 5), b ~ N(0, 0.03²); shape 1.2
    rng = np.random.default_rng(seed)
    h = _hospitals(rng, 40, 5, 150)
    x = rng.uniform(0, 5, len(h)).round(3)
    b = rng.normal(0, 0.03, 40)
    mu = 1.0 / (0.2 + 0.02 * x + b[h])
    los = rng.gamma(1.2, mu / 1.2).round(3) + 0.001
    df = pd.DataFrame({"los": los, "x": x, "hospital": _labels(40, "h")[h]})
    return df, "los ~ x + (1 | hospital)", "gamma/inverse", {"beta": [0.2, 0.02], "sd": [0.03],
                                                             "sigma": 1 / np.sqrt(1.2)}


CASES = [nb_small_groups, nb_rare, nb_near_poisson, gamma_los_skewed, gamma_los_slope, gamma_inverse_skewed]


def _glmmtmb(path: Path, formula: str, family: str) -> dict | None:
    out = path.with_suffix(".tmb.json")
    try:
        subprocess.run(["Rscript", str(R_SCRIPT), str(path), formula, family, str(out)], check=True,
                       capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"  glmmTMB failed: {e}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def _vector(res) -> np.ndarray:
    return np.r_[res.fixef.to_numpy(), [r.get("sd", r.get("corr")) for r in res.random],
                 next(iter(res.dispersion.values())), res.loglik]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--no-r", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out or tempfile.mkdtemp(prefix="sim_families_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'case':22s} {'rows':>5s} {'grp':>4s} {'rnd':>3s} {'rnd K':>5s} {'ΔlogLik':>9s} {'β/SE':>7s} "
          f"{'SE':>7s} {'SD':>7s} {'disp':>7s} {'split':>7s} {'truth β/SE':>10s} {'disp/true':>9s} {'sec':>5s}")
    for make in CASES:
        df, formula, family, truth = make()
        name = make.__name__
        path = out / f"{name}.csv"
        df.to_csv(path, index=False)
        fam, _, link = family.partition("/")
        group = formula.split("|")[-1].strip(" )")
        t0 = time.perf_counter()
        res = fedglmm.fit(formula, df, family=fam, link=link or None)
        sec = time.perf_counter() - t0
        codes = pd.factorize(df[group])[0]
        sites = {f"s{k}": df[codes % args.sites == k] for k in range(args.sites)}
        sp = fedglmm.fit(formula, sites, family=fam, link=link or None)
        split = float(np.max(np.abs(_vector(sp) - _vector(res)) / np.maximum(1.0, np.abs(_vector(res)))))
        key = "theta" if fam == "negative_binomial" else "sigma"
        disp = res.dispersion[key]
        tb = float(np.max(np.abs(res.fixef.to_numpy() - np.array(truth["beta"])) / res.se.to_numpy()))
        ref = None if args.no_r else _glmmtmb(path, formula, family)
        cols = {"dll": np.nan, "beta": np.nan, "se": np.nan, "sd": np.nan, "disp": np.nan}
        if ref is not None:
            fx = {_r_name(k): v for k, v in res.fixef.items()}
            se = {_r_name(k): v for k, v in res.se.items()}
            cols["dll"] = res.loglik - ref["logLik"]
            cols["beta"] = max(abs(fx[k] - ref["fixef"][k]) / ref["se"][k] for k in ref["fixef"])
            cols["se"] = max(abs(se[k] - ref["se"][k]) / ref["se"][k] for k in ref["se"])
            ref_sd = ref_sds(ref)
            ours = [r["sd"] for r in res.random if "sd" in r]
            cols["sd"] = max(abs(a - b) / b for a, b in zip(ours, ref_sd))
            rd = ref["nb_theta"] if fam == "negative_binomial" else ref["gamma_sigma"]
            cols["disp"] = abs(disp - rd) / rd
        print(f"{name:22s} {len(df):5d} {df[group].nunique():4d} {res.rounds:3d} {sp.rounds:5d} "
              f"{cols['dll']:9.1e} {cols['beta']:7.1e} {cols['se']:7.1e} {cols['sd']:7.1e} {cols['disp']:7.1e} "
              f"{split:7.1e} {tb:10.2f} {disp / truth[key]:9.3f} {sec:5.1f}"
              + ("" if res.converged else "  NOT CONVERGED"))
    print(f"data and glmmTMB fits in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
