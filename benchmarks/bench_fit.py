#!/usr/bin/env python3
"""Time fedglmm fits, and the same models fitted by lme4's glmer/lmer in R.

usage (from anywhere):
    python3 benchmarks/bench_fit.py [--repeat 3] [--no-r] [--quick] [--only REGEX] [--json OUT]
                                    [--cases TSV] [--extra-cases TSV]

Models (see benchmarks/README.md): every case of the reference case table and of
tests/data/extra_cases.tsv (pooled data, one site), a simulated 1e5-row logistic model split over 5
sites, and the seed-001 settings (10 sites x 500 patients; 2 sites x 30 patients), where each site is
both its own data site and its own random-intercept group.

fedglmm's time is the median of ``res.seconds`` over --repeat fits (fit only: no data loading).
glmer's time is the ``seconds`` printed by benchmarks/r/glmer_time.R (R's own fit time, without R's
start-up and the CSV read). ratio = glmer seconds / fedglmm seconds (> 1: fedglmm is faster).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
GLMER_TIME = ROOT / "benchmarks" / "r" / "glmer_time.R"
# the reference case table: the project's copy if there is one, else the shared original (identical)
REF_CASES = next((p for p in (DATA / "cases.tsv", Path("/work/shared/reference/cases.tsv")) if p.exists()),
                 DATA / "cases.tsv")
EXTRA_CASES = DATA / "extra_cases.tsv"
R_TIMEOUT = 600  # seconds for one R fit


@dataclass
class Model:
    name: str
    formula: str
    family: str
    link: str | None          # None: the family's default link (both in fedglmm and in R)
    nagq: int                 # 1 = Laplace
    reml: bool
    data: object              # what fedglmm.fit gets: a DataFrame (one site) or {site_id: DataFrame}
    tags: set = field(default_factory=set)

    @property
    def noncanonical(self) -> bool:  # probit / cloglog: the Laplace curvature choice matters
        return self.link in ("probit", "cloglog")

    def pooled(self) -> pd.DataFrame:
        if isinstance(self.data, pd.DataFrame):
            return self.data
        return pd.concat(list(self.data.values()), ignore_index=True)


# --- the models ----------------------------------------------------------------------------------

def read_cases(path: Path) -> list[dict]:
    """A case table: first line '# name<TAB>data<TAB>...' names the columns."""
    lines = path.read_text().splitlines()
    header = lines[0].lstrip("#").strip().split("\t")
    rows = []
    for line in lines[1:]:
        if not line.strip() or line.startswith("#"):
            continue
        rows.append(dict(zip(header, line.split("\t"))))
    return rows


def case_models(path: Path) -> list[Model]:
    models = []
    for c in read_cases(path):
        csv = DATA / f"{c['data']}.csv"
        if not csv.exists():  # the reference table's data also live next to it
            csv = path.parent / "data" / f"{c['data']}.csv"
        family = c["family"]
        link = c.get("link") or None
        if link is not None and link == {"gaussian": "identity", "poisson": "log"}.get(family):
            link = None
        nagq = int(c.get("nagq") or 1)
        models.append(Model(c["name"], c["formula"], family, link, max(1, nagq),
                            c.get("reml", "0") == "1", pd.read_csv(csv), {"case"}))
    return models


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def sim_logit_1e5(seed: int = 20250101) -> Model:
    """1e5 rows: 1000 groups x 100 rows, x1..x5 ~ N(0, 1); random intercept sd 0.8, slope (x1) sd 0.4,
    independent; eta = -0.5 + 0.5 x1 - 0.3 x2 + 0.2 x3 + 0.1 x4 - 0.2 x5 + b0 + b1 x1. 5 sites of 200
    whole groups each."""
    rng = np.random.default_rng(seed)
    G, m, nsites = 1000, 100, 5
    g = np.repeat(np.arange(G), m)
    n = G * m
    X = rng.normal(size=(n, 5))
    beta = np.array([0.5, -0.3, 0.2, 0.1, -0.2])
    b0 = rng.normal(0.0, 0.8, size=G)
    b1 = rng.normal(0.0, 0.4, size=G)
    eta = -0.5 + X @ beta + b0[g] + b1[g] * X[:, 0]
    y = (rng.random(n) < expit(eta)).astype(int)
    df = pd.DataFrame(X, columns=[f"x{k}" for k in range(1, 6)])
    df.insert(0, "g", np.array([f"g{i + 1:04d}" for i in range(G)])[g])
    df["y"] = y
    site = g // (G // nsites)
    data = {f"site{s + 1}": df[site == s].reset_index(drop=True) for s in range(nsites)}
    return Model("sim_logit_1e5", "y ~ x1 + x2 + x3 + x4 + x5 + (1 + x1 | g)", "binomial", None, 1,
                 False, data, {"sim", "big"})


SEED001_BETA = np.array([-1.5, 0.1, -0.5, -0.3, 0.4, -0.2, -0.25, 0.35, -0.1, 0.5])


def seed001(name: str, nsites: int, npat: int, var: float, seed: int) -> Model:
    """The seed-001 simulation setting: per site npat patients, X1-X4 ~ Bernoulli(0.5), X5-X10 ~ U[-1, 1.5],
    eta = X beta + u_site (no fixed intercept), u_site ~ N(0, var), y ~ Bernoulli(expit(eta)).
    Each site is its own group: the site column is the grouping factor, and each site's rows are its
    own data site."""
    rng = np.random.default_rng(seed)
    w = len(str(nsites))
    data = {}
    for s in range(nsites):
        X = np.column_stack([rng.binomial(1, 0.5, size=(npat, 4)).astype(float),
                             rng.uniform(-1.0, 1.5, size=(npat, 6))])
        u = rng.normal(0.0, math.sqrt(var))
        y = (rng.random(npat) < expit(X @ SEED001_BETA + u)).astype(int)
        sid = f"s{s + 1:0{w}d}"
        df = pd.DataFrame(X, columns=[f"X{k}" for k in range(1, 11)])
        df.insert(0, "site", sid)
        df["y"] = y
        data[sid] = df
    formula = "y ~ 0 + " + " + ".join(f"X{k}" for k in range(1, 11)) + " + (1 | site)"
    return Model(name, formula, "binomial", None, 1, False, data, {"sim", "seed001"})


def all_models(args) -> list[Model]:
    models = []
    for path in (Path(args.cases), Path(args.extra_cases)):
        if path.exists():
            models += case_models(path)
        else:
            print(f"warning: case table {path} not found; skipped", file=sys.stderr)
    models.append(sim_logit_1e5())
    models.append(seed001("seed001_10x500", 10, 500, 1.0, seed=1))
    models.append(seed001("seed001_2x30", 2, 30, 4.0, seed=2))
    if args.only:
        models = [m for m in models if re.search(args.only, m.name)]
    return models


# --- fitting -------------------------------------------------------------------------------------

def run_fedglmm(m: Model, repeat: int, curvature: str | None = None) -> dict:
    times, res = [], None
    extra = {"curvature": curvature} if curvature else {}
    for _ in range(repeat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fedglmm.fit(m.formula, m.data, family=m.family, link=m.link, nagq=m.nagq, reml=m.reml,
                              **extra)
        times.append(res.seconds)
    return {"n": res.nobs, "groups": int(sum(res.ngroups.values())), "sites": res.nsites,
            "params": res.n_params, "seconds": statistics.median(times), "seconds_all": times,
            "rounds": res.rounds, "kib_to": res.bytes_to_sites / 1024, "kib_from": res.bytes_from_sites / 1024,
            "loglik": res.loglik, "converged": bool(res.converged)}


def r_available() -> tuple[bool, str]:
    if shutil.which("Rscript") is None:
        return False, "Rscript not on PATH"
    try:
        p = subprocess.run(["Rscript", "-e", "suppressPackageStartupMessages({library(lme4); library(jsonlite)});"
                            "cat(as.character(packageVersion('lme4')))"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"Rscript failed: {e}"
    if p.returncode != 0:
        return False, "lme4/jsonlite do not load: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    return True, f"lme4 {p.stdout.strip()}"


def run_glmer(m: Model, tmpdir: Path) -> dict:
    csv = tmpdir / f"{m.name}.csv"
    m.pooled().to_csv(csv, index=False)  # pandas writes floats round-trip exact
    cmd = ["Rscript", str(GLMER_TIME), str(csv), m.formula, m.family, str(m.nagq),
           "1" if m.reml else "0", m.link or ""]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=R_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"r_error": f"timeout after {R_TIMEOUT}s"}
    finally:
        csv.unlink(missing_ok=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    if p.returncode != 0 or not lines:
        return {"r_error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
    out = json.loads(lines[-1])
    return {"r_seconds": out["seconds"], "r_loglik": out["logLik"], "r_loglik_full": out["logLik_full"]}


# --- output --------------------------------------------------------------------------------------

COLS = [  # key, header, width, format
    ("name", "model", 22, "{}"), ("n", "n", 7, "{:d}"), ("groups", "groups", 6, "{:d}"),
    ("sites", "sites", 5, "{:d}"), ("params", "params", 6, "{:d}"), ("seconds", "fed_s", 8, "{:.3f}"),
    ("rounds", "rounds", 6, "{:d}"), ("kib_to", "KiB_to", 7, "{:.1f}"), ("kib_from", "KiB_from", 8, "{:.1f}"),
    ("loglik", "fed_logLik", 12, "{:.3f}"), ("r_seconds", "glmer_s", 8, "{:.3f}"),
    ("r_loglik_full", "glmer_logLik", 12, "{:.3f}"), ("dloglik", "dlogLik", 8, "{:.4f}"),
    ("ratio", "ratio", 7, "{:.1f}"),
]


def fmt_row(row: dict) -> str:
    cells = []
    for key, _, width, f in COLS:
        v = row.get(key)
        if key == "dloglik" and v is not None and abs(v) < 5e-5:
            v = 0.0  # no "-0.0000"
        s = "-" if v is None else f.format(v)
        if key == "name" and not row.get("converged", True):
            s += "*"
        cells.append(s.ljust(width) if key == "name" else s.rjust(width))
    return " ".join(cells)


def header() -> str:
    return " ".join(h.ljust(w) if k == "name" else h.rjust(w) for k, h, w, _ in COLS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="fedglmm fits per model; the median time is shown")
    ap.add_argument("--no-r", action="store_true", help="skip the lme4 fits")
    ap.add_argument("--quick", action="store_true", help="skip the lme4 fit of sim_logit_1e5 (the slow one)")
    ap.add_argument("--only", metavar="REGEX", help="only models whose name matches")
    ap.add_argument("--json", metavar="OUT", help="write the rows as a JSON list to OUT ('-' for stdout)")
    ap.add_argument("--curvature", choices=("observed", "expected"),
                    help="passed to fedglmm.fit (probit/cloglog only; default: fedglmm's own default). "
                         "'expected' is the approximation glmer maximises")
    ap.add_argument("--cases", default=str(REF_CASES), help=f"reference case table (default {REF_CASES})")
    ap.add_argument("--extra-cases", default=str(EXTRA_CASES), help="extra case table (tests/data/extra_cases.tsv)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be ≥ 1")

    use_r, r_note = (False, "skipped (--no-r)") if args.no_r else r_available()
    models = all_models(args)
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"fedglmm {fedglmm.__version__}; R: {r_note}; median of {args.repeat} fedglmm fit(s); "
          f"times in seconds; * = fedglmm did not report convergence", file=out)
    print(header(), file=out)
    print("-" * len(header()), file=out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        for m in models:
            row = {"name": m.name, "formula": m.formula, "family": m.family, "link": m.link,
                   "nagq": m.nagq, "reml": m.reml, "curvature": args.curvature if m.noncanonical else None}
            try:
                row.update(run_fedglmm(m, args.repeat, args.curvature))
            except Exception as e:  # report and keep going: one failing model should not hide the rest
                row["error"] = f"{type(e).__name__}: {e}"
            if use_r and not (args.quick and "big" in m.tags):
                row.update(run_glmer(m, Path(tmp)))
                if "r_loglik_full" in row and "loglik" in row:
                    row["dloglik"] = row["loglik"] - row["r_loglik_full"]
                if row.get("r_seconds") is not None and row.get("seconds"):
                    row["ratio"] = row["r_seconds"] / row["seconds"]
            print(fmt_row(row), file=out, flush=True)
            for key in ("error", "r_error"):
                if key in row:
                    print(f"  {m.name}: {'fedglmm' if key == 'error' else 'R'} error: {row[key]}", file=out)
            rows.append(row)

    low = [r["name"] for r in rows if r.get("dloglik") is not None and r["dloglik"] < -1e-3]
    if use_r:
        print(f"logLik check (fedglmm ≥ glmer full logLik − 1e-3): "
              f"{'all pass' if not low else 'BELOW on ' + ', '.join(low)}", file=out)
        nc = [m.name for m in models if m.noncanonical]
        if nc and args.curvature != "expected":
            print(f"note: {', '.join(nc)} (probit/cloglog) use fedglmm's default curvature, not glmer's expected "
                  "(Fisher) weights, so dlogLik there compares two Laplace approximations; "
                  "--curvature expected fits glmer's", file=out)
    by = {r["name"]: r for r in rows}
    big, s1 = by.get("sim_logit_1e5", {}), by.get("seed001_10x500", {})
    parts = []
    if big:
        parts.append("sim_logit_1e5 glmer/fedglmm time ratio = "
                     + (f"{big['ratio']:.1f}" if big.get("ratio") is not None
                        else "n/a (no glmer fit: --quick or --no-r)" if big.get("r_error") is None
                        else "n/a (glmer failed)")
                     + (f" ({big['r_seconds']:.2f}s / {big['seconds']:.2f}s)" if big.get("ratio") else ""))
    if s1.get("seconds") is not None:
        parts.append(f"seed001_10x500 fedglmm time = {s1['seconds']:.3f}s")
    if parts:
        print("; ".join(parts), file=out)

    if args.json:
        text = json.dumps(rows, indent=2, default=float)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
