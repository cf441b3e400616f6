#!/usr/bin/env python3
"""Registry scale: fit time, rounds, site work per round against one pass over the rows, and peak memory,
for a logistic GLMM with 1e5, 1e6 and 1e7 rows over 10 and 100 sites; start-up times; and, where
installed, glmmTMB, glmer (R) and GPBoost on the same data.

usage (from anywhere):
    python3 benchmarks/bench_scale.py [--sizes 1e5,1e6,1e7] [--sites 10,100] [--methods hybrid,iterative]
                                      [--competitors glmmTMB,glmer,gpboost | --no-competitors]
                                      [--timeout 600] [--no-startup] [--readme] [--json OUT]

Data (see benchmarks/README.md): N rows in N/100 groups of 100, x1..x5 ~ N(0, 1),
η = −0.5 + 0.5 x1 − 0.3 x2 + 0.2 x3 + 0.1 x4 − 0.2 x5 + b0 + b1·x1, b0 ~ N(0, 0.8²), b1 ~ N(0, 0.4²),
y ~ Bernoulli(expit η); fitted as ``y ~ x1 + x2 + x3 + x4 + x5 + (1 + x1 | g)``.  Every block of 10 groups
has its own random stream, so the rows do not depend on the number of sites; sites hold consecutive
groups.  Each fedglmm fit runs in its own process (its peak resident memory includes the data).

Columns: ``fit_s`` wall seconds of the fit (data in memory, sites built), the first in its process (it
loads the compiled kernel: about 1.2 s of CPU here); ``warm_s`` the same fit again in that process with
sites built anew (a long-running site server's case); ``cpu_s`` the CPU seconds of the
process during the fit (all threads: on an idle 2-core machine fit_s is about cpu_s / 2 or more);
``s/round`` = fit_s / rounds;
``site_s/round`` the sites' CPU seconds per Newton round (evaluate and finalize rounds; summed over the
sites, i.e. the work, not the wall time of parallel sites); ``pass_s`` CPU seconds of one numpy pass
computing the log-likelihood over all rows at the estimate (η, the logit log-density, the sum; the same
process); ``ratio`` = site_s/round ÷ pass_s; ``peak_GB`` the process's peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FORMULA = "y ~ x1 + x2 + x3 + x4 + x5 + (1 + x1 | g)"
BETA = np.array([-0.5, 0.5, -0.3, 0.2, 0.1, -0.2])
BLOCK = 10              # groups per random stream
R_SCRIPT = ROOT / "benchmarks" / "r" / "scale_fit.R"


# --- data ------------------------------------------------------------------------------------------

def block(b: int, seed: int = 20250101) -> dict:
    """The rows of groups 10b .. 10b + 9 (100 rows each)."""
    rng = np.random.default_rng([seed, b])
    n = BLOCK * 100
    x = rng.standard_normal((n, 5))
    b0, b1 = rng.normal(0.0, 0.8, BLOCK), rng.normal(0.0, 0.4, BLOCK)
    eta = BETA[0] + x @ BETA[1:] + np.repeat(b0, 100) + np.repeat(b1, 100) * x[:, 0]
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return {"x": x, "y": y, "g": np.repeat(np.arange(b * BLOCK, (b + 1) * BLOCK), 100)}


def site_frames(n: int, sites: int) -> dict:
    """{site: DataFrame} with consecutive groups per site."""
    import pandas as pd

    nblocks = n // (100 * BLOCK)
    out = {}
    for s, blocks in enumerate(np.array_split(np.arange(nblocks), sites)):
        parts = [block(int(b)) for b in blocks]
        x = np.concatenate([p["x"] for p in parts])
        frame = pd.DataFrame({"y": np.concatenate([p["y"] for p in parts])})
        for k in range(5):
            frame[f"x{k + 1}"] = x[:, k]
        frame["g"] = np.concatenate([p["g"] for p in parts])
        out[f"s{s:03d}"] = frame
        del parts, x
    return out


def write_csv(n: int, path: Path) -> None:
    """The pooled rows as one CSV, written block by block."""
    with open(path, "w") as fh:
        fh.write("y,x1,x2,x3,x4,x5,g\n")
        for b in range(n // (100 * BLOCK)):
            d = block(b)
            rows = np.column_stack([d["y"], d["x"], d["g"]])
            np.savetxt(fh, rows, fmt=["%d"] + ["%.17g"] * 5 + ["%d"], delimiter=",")


# --- one fedglmm fit (child process) ----------------------------------------------------------------

def one_pass(frames: dict, res) -> float:
    """CPU seconds of one numpy pass computing the log-likelihood at the estimate over all rows."""
    beta = res.fixef.to_numpy()
    modes = res.ranef()
    b = {str(k): v for k, v in zip(modes.index, modes.to_numpy())}
    arrays = []
    for frame in frames.values():
        X = np.column_stack([np.ones(len(frame))] + [frame[f"x{k}"].to_numpy() for k in range(1, 6)])
        codes, inv = np.unique(frame["g"].to_numpy(), return_inverse=True)
        B = np.array([b[str(c)] for c in codes])
        arrays.append((X, frame["y"].to_numpy(), inv, B))
    best = np.inf
    for _ in range(3):
        t0 = time.thread_time()
        total = 0.0
        for X, y, inv, B in arrays:
            eta = X @ beta + B[inv, 0] + B[inv, 1] * X[:, 1]
            total += float(np.sum(y * eta - np.logaddexp(0.0, eta)))
        best = min(best, time.thread_time() - t0)
    return best


def child(n: int, sites: int, method: str) -> dict:
    from fedglmm.api import make_sites, run
    from fedglmm.model.options import fit_request
    from fedglmm.transport import InProcessTransport

    frames = site_frames(n, sites)
    transport = InProcessTransport(make_sites(frames))
    req = fit_request(FORMULA, "binomial", None, method=method)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run(transport, req)
    fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    newton = [r for r in transport.timings if r["kind"] in ("evaluate", "finalize")]
    work = [sum(r["site_cpu"].values()) for r in newton]
    pass_s = one_pass(frames, res)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # (before the second fit's sites)
    timings = transport.timings
    del transport
    # the same fit again in this process, with sites built anew: what a long-running site server takes,
    # the compiled kernel and the modules already loaded (the first fit above pays that once)
    transport2 = InProcessTransport(make_sites(frames))
    t1 = time.perf_counter()
    run(transport2, req)
    warm_s = time.perf_counter() - t1
    return {"rows": n, "sites": sites, "method": method, "fit_s": fit_s, "warm_s": warm_s, "cpu_s": cpu_s,
            "rounds": res.rounds,
            "site_s_round": statistics.mean(work) if work else float("nan"),
            "site_wall_round": statistics.mean(r["wall"] for r in newton) if newton else float("nan"),
            "pass_s": pass_s, "loglik": float(res.loglik),
            "peak_GB": peak,
            "rounds_detail": [(r["kind"], round(sum(r["site_cpu"].values()), 4), round(r["wall"], 4))
                              for r in timings]}


# --- start-up ---------------------------------------------------------------------------------------

def startup(repeat: int = 5) -> list[dict]:
    """Wall and CPU seconds of `fedglmm --version`, `fedglmm fit --help` and `fedglmm demo` (a small fit:
    1934 rows, 4 sites), median of ``repeat`` runs each, after one untimed run.  The children run with
    Python's byte-code cache on (PYTHONDONTWRITEBYTECODE, if set here, is dropped for them), as an
    installed package runs (pip compiles it): the untimed run writes the cache of an editable checkout;
    compiling fedglmm's ~90 modules on every run would add about 0.12 s."""
    exe = [sys.executable, "-m", "fedglmm.cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = []
    for label, args in (("fedglmm --version", ["--version"]), ("fedglmm fit --help", ["fit", "--help"]),
                        ("fedglmm demo (1934 rows, 4 sites)", ["demo", "-q"])):
        subprocess.run(exe + args, check=True, capture_output=True, env=env)
        walls, cpus = [], []
        for _ in range(repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(exe + args, check=True, capture_output=True, env=env)
            walls.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        out.append({"command": label, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)})
    return out


# --- competitors ------------------------------------------------------------------------------------

def r_available(package: str) -> bool:
    if shutil.which("Rscript") is None:
        return False
    ok = subprocess.run(["Rscript", "-e", f"suppressPackageStartupMessages(library({package}))"],
                        capture_output=True)
    return ok.returncode == 0


def gpboost_child(csv: str) -> dict:
    import gpboost as gpb
    import pandas as pd

    d = pd.read_csv(csv)
    X = np.column_stack([np.ones(len(d))] + [d[f"x{k}"].to_numpy() for k in range(1, 6)])
    t0 = time.perf_counter()
    model = gpb.GPModel(group_data=d["g"].to_numpy(), group_rand_coef_data=d["x1"].to_numpy(),
                        ind_effect_group_rand_coef=[1], likelihood="bernoulli_logit")
    model.fit(y=d["y"].to_numpy(), X=X)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "logLik": -float(model.get_current_neg_log_likelihood())}


def competitor(name: str, csv: Path, timeout: float) -> dict:
    """One competitor's fit in its own process; {"seconds", "logLik"} or {"skipped": reason}."""
    if name == "gpboost":
        cmd = [sys.executable, __file__, "--gpboost-child", str(csv)]
    else:
        cmd = ["Rscript", str(R_SCRIPT), str(csv), name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"> {timeout:.0f} s"}
    if out.returncode != 0:
        return {"skipped": "failed: " + " ".join(out.stderr.split())[-200:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_competitors(names: list[str]) -> dict:
    found = {}
    for name in names:
        if name == "gpboost":
            ok = subprocess.run([sys.executable, "-c", "import gpboost"], capture_output=True).returncode == 0
            found[name] = ok or "not installed (pip install gpboost)"
        else:
            pkg = {"glmmTMB": "glmmTMB", "glmer": "lme4"}[name]
            found[name] = r_available(pkg) or f"R package {pkg} not installed"
    return found


def run_competitors(sizes: list[int], names: list[str], timeout: float) -> list[dict]:
    """Each competitor at each size until it takes longer than ``timeout``; beyond that it is skipped."""
    found = available_competitors(names)
    given_up: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            csv = Path(tmp) / f"scale_{n}.csv"
            row = {"rows": n}
            for name in names:
                if found[name] is not True:
                    row[name] = {"skipped": found[name]}
                    continue
                if name in given_up:
                    row[name] = {"skipped": f"not run: {given_up[name]}"}
                    continue
                if not csv.exists():
                    write_csv(n, csv)
                row[name] = competitor(name, csv, timeout)
                if "skipped" in row[name]:
                    given_up[name] = f"{row[name]['skipped']} at {n:.0e} rows"
                print(f"  {name} at {n:.0e} rows: {row[name]}", file=sys.stderr, flush=True)
            rows.append(row)
            csv.unlink(missing_ok=True)
    return rows


# --- tables -----------------------------------------------------------------------------------------

def fit_table(rows: list[dict]) -> str:
    head = ("| rows | sites | method | fit_s | warm_s | cpu_s | rounds | s/round | site_s/round | pass_s | ratio | peak_GB "
            "| logLik |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['rows']:.0e} | {r['sites']} | {r['method']} | {r['error']} |||||||||||")
            continue
        lines.append(f"| {r['rows']:.0e} | {r['sites']} | {r['method']} | {r['fit_s']:.2f} | {r.get('warm_s', float('nan')):.2f} | "
                     f"{r['cpu_s']:.2f} | {r['rounds']} | "
                     f"{r['fit_s'] / r['rounds']:.3f} | {r['site_s_round']:.3f} | {r['pass_s']:.4f} | "
                     f"{r['site_s_round'] / r['pass_s']:.1f} | {r['peak_GB']:.2f} | {r['loglik']:.3f} |")
    return "\n".join(lines)


def competitor_table(rows: list[dict], names: list[str]) -> str:
    lines = ["| rows | " + " | ".join(f"{n} s (logLik)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            c = r.get(n, {})
            cells.append(c["skipped"] if "skipped" in c else f"{c['seconds']:.1f} ({c['logLik']:.3f})")
        lines.append(f"| {r['rows']:.0e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def startup_table(rows: list[dict]) -> str:
    lines = ["| command | wall s (median of 5) | CPU s |", "|---|---|---|"]
    lines += [f"| `{r['command']}` | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def update_readme(text: str) -> None:
    path = ROOT / "benchmarks" / "README.md"
    start, end = "<!-- bench_scale: begin -->", "<!-- bench_scale: end -->"
    body = path.read_text()
    if start in body and end in body:
        body = body[: body.index(start)] + start + "\n" + text + "\n" + end + body[body.index(end) + len(end):]
    else:
        body += "\n" + start + "\n" + text + "\n" + end + "\n"
    path.write_text(body)


# --- main -------------------------------------------------------------------------------------------

def fit_rows(sizes, sites, methods, timeout) -> list[dict]:
    rows = []
    for n in sizes:
        for s in sites:
            for m in methods:
                cmd = [sys.executable, __file__, "--child", str(n), str(s), m]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                    row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                        {"rows": n, "sites": s, "method": m, "error": " ".join(out.stderr.split())[-200:]}
                except subprocess.TimeoutExpired:
                    row = {"rows": n, "sites": s, "method": m, "error": f"> {timeout:.0f} s"}
                print(f"  {n:.0e} rows, {s} sites, {m}: " + (row.get("error") or
                      f"{row['fit_s']:.2f} s, {row['rounds']} rounds, ratio {row['site_s_round'] / row['pass_s']:.1f}, "
                      f"peak {row['peak_GB']:.2f} GB"), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6,1e7")
    ap.add_argument("--sites", default="10,100")
    ap.add_argument("--methods", default="hybrid,iterative")
    ap.add_argument("--competitors", default="glmmTMB,glmer,gpboost")
    ap.add_argument("--no-competitors", action="store_true")
    ap.add_argument("--no-startup", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for any one fit (default 600)")
    ap.add_argument("--readme", action="store_true", help="write the tables into benchmarks/README.md")
    ap.add_argument("--json", help="also write all rows as JSON")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--gpboost-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(int(float(a.child[0])), int(a.child[1]), a.child[2])))
        return
    if a.gpboost_child:
        print(json.dumps(gpboost_child(a.gpboost_child)))
        return
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    load0 = os.getloadavg()
    parts = [f"2-core machine ({os.cpu_count()} CPUs seen); load average at start "
             f"{load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1 / 5 / 15 min)", ""]
    rows = fit_rows(sizes, [int(s) for s in a.sites.split(",")], a.methods.split(","), a.timeout)
    parts += ["fedglmm, `" + FORMULA + "`, binomial (Laplace):", "", fit_table(rows), ""]
    report = {"fits": rows}
    if not a.no_startup:
        report["startup"] = startup()
        parts += ["Start-up:", "", startup_table(report["startup"]), ""]
    if not a.no_competitors:
        names = a.competitors.split(",")
        report["competitors"] = run_competitors(sizes, names, a.timeout)
        parts += ["Other programs on the same (pooled) rows, fit time in seconds (logLik):", "",
                  competitor_table(report["competitors"], names), ""]
    load1 = os.getloadavg()
    parts.append(f"load average at end {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}")
    text = "\n".join(parts)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.readme:
        update_readme(text)


if __name__ == "__main__":
    main()
