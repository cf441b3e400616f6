#!/usr/bin/env python3
"""A multi-centre logistic model with two grouping factors, fedglmm against glmer and glmmTMB.

usage: python3 benchmarks/bench_multilevel.py [--no-r] [--small] [--json OUT]

The data (numpy ``default_rng(20251101)``): 100 hospitals, 100 patients each (10,000), 10 visits each
(1e5 rows), time = visit/3, a patient-level treatment ``trt`` ~ Bernoulli(½) and ``age`` ~ N(0, 1),

    logit P(y = 1) = −0.5 − 0.3 time + 0.4 trt + 0.2 age + b0 + b1·time + h,
    (b0, b1) ~ N(0, [[1, −0.09], [−0.09, 0.09]]) per patient,  h ~ N(0, 0.4²) per hospital,

fitted as ``y ~ time + trt + age + (1 + time | patient) + (1 | hospital)`` with the hospitals spread over
10 sites (hospital mod 10: 10 hospitals, 1,000 patients and 10,000 visits each).  ``--small`` uses 20
hospitals (2e4 rows) for a quick look.

Printed per fit: wall seconds, CPU seconds (this process and its threads; on a busy machine the fair
measure, since the wall time there depends on the other load), rounds, logLik and its difference from
glmer's, and peak memory: for fedglmm the largest amount Python and numpy held during a separate fit
(``tracemalloc``), for R ``gc()``'s "max used" (R's heap; memory TMB allocates in C++ is not in it).
Both sides are timed with their libraries loaded: a small fit first loads fedglmm's modules (about 1 s
of CPU, as R's ``library(lme4)``, which ``multilevel_time.R`` runs before its clock starts).  The last
line gives the peak resident memory of the whole processes (``getrusage``): this one (data, modules,
all fits) and the R process (both R fits).
R (``Rscript`` with lme4, glmmTMB and jsonlite) runs ``benchmarks/r/multilevel_time.R`` on the same rows;
without R only fedglmm is timed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm

ROOT = Path(__file__).resolve().parents[1]
R_SCRIPT = ROOT / "benchmarks" / "r" / "multilevel_time.R"
FORMULA = "y ~ time + trt + age + (1 + time | patient) + (1 | hospital)"


def simulate(hospitals: int = 100, patients: int = 100, visits: int = 10, seed: int = 20251101) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    P = hospitals * patients
    hosp = np.repeat(np.arange(hospitals), patients * visits)
    pat = np.repeat(np.arange(P), visits)
    t = np.tile(np.arange(visits) / 3.0, P)
    trt = np.repeat(rng.integers(0, 2, P), visits)
    age = np.repeat(rng.normal(size=P), visits)
    L = np.array([[1.0, 0.0], [-0.09, 0.3 * np.sqrt(1 - 0.09)]])
    b = rng.normal(size=(P, 2)) @ L.T
    h = rng.normal(scale=0.4, size=hospitals)
    eta = -0.5 - 0.3 * t + 0.4 * trt + 0.2 * age + b[pat, 0] + b[pat, 1] * t + h[hosp]
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-eta)))
    return pd.DataFrame({"y": y, "time": t, "trt": trt, "age": age, "patient": pat, "hospital": hosp,
                         "site": hosp % 10})


def run_fedglmm(df: pd.DataFrame, method: str) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    res = fedglmm.fit(FORMULA, df, family="binomial", site="site", method=method)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tracemalloc.start()
    fedglmm.fit(FORMULA, df, family="binomial", site="site", method=method)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"engine": f"fedglmm {method}", "seconds": wall, "cpu_seconds": cpu, "rounds": res.rounds,
            "logLik": res.loglik, "peak_mb": peak, "fixef": res.fixef.to_dict(),
            "sd": [r.get("sd", r.get("corr")) for r in res.random], "sites": res.nsites}


def run_r(df: pd.DataFrame) -> list[dict]:
    if shutil.which("Rscript") is None:
        print("R: Rscript not found, glmer and glmmTMB skipped", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        df.drop(columns="site").to_csv(path, index=False)
        out = subprocess.run(["Rscript", str(R_SCRIPT), str(path), FORMULA, "both"], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"R failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}",
              file=sys.stderr)
        return []
    got = json.loads(out.stdout)
    return [{"engine": name, "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "rounds": None,
             "logLik": r["logLik"], "peak_mb": r["max_mem_mb"], "fixef": r.get("fixef", {})}
            for name, r in got.items()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--small", action="store_true", help="20 hospitals (2e4 rows) instead of 100 (1e5)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    df = simulate(hospitals=20 if args.small else 100)
    print(f"{len(df)} visits, {df.patient.nunique()} patients, {df.hospital.nunique()} hospitals, "
          f"{df.site.nunique()} sites; {FORMULA}")
    fedglmm.fit("y ~ time + (1 | patient) + (1 | hospital)", df.iloc[:3000], family="binomial")   # load modules
    rows = [run_fedglmm(df, "hybrid"), run_fedglmm(df, "iterative")]
    rows += [] if args.no_r else run_r(df)
    glmer = next((r for r in rows if r["engine"] == "glmer"), None)
    print(f"{'engine':18s} {'wall s':>8s} {'cpu s':>8s} {'rounds':>6s} {'logLik':>14s} {'- glmer':>9s} "
          f"{'peak MB':>8s}")
    for r in rows:
        diff = f"{r['logLik'] - glmer['logLik']:9.2e}" if glmer else f"{'':9s}"
        rounds = "" if r["rounds"] is None else str(r["rounds"])
        print(f"{r['engine']:18s} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {rounds:>6s} {r['logLik']:14.4f} "
              f"{diff} {r['peak_mb']:8.1f}")
    if glmer:
        for r in rows[:2]:
            print(f"{r['engine']}: {r['seconds'] / glmer['seconds']:.3f} x glmer's wall time, "
                  f"{r['cpu_seconds'] / glmer['cpu_seconds']:.3f} x its CPU time; logLik − glmer's "
                  f"{r['logLik'] - glmer['logLik']:+.2e}")
    rss = {who: resource.getrusage(w).ru_maxrss / 1024 for who, w in
           (("this process", resource.RUSAGE_SELF), ("R", resource.RUSAGE_CHILDREN))}
    print("peak resident memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items() if v))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
