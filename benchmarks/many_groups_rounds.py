"""Rounds of the hybrid where every site holds 100-500 groups, each large enough for its summaries to go.

Random shapes (seeded): family (binomial, poisson, negative binomial, Gamma with the log link and with the
inverse link, lme4's default, on the same log-link data), 2-6 sites,
100-400 groups a site, 10-40 rows a group, a random intercept or intercept and slope, its SD 0.3-2, a
covariate and a group-level one.  Each draw is fitted by the hybrid and by the iterative method over the sites;
printed: the rounds of each, and the largest difference between the two (fixed effects and θ absolute,
log-likelihood relative, conditional SDs relative).  At the end the rounds in all, those above 3 and 4, and
the largest difference.

    python3 benchmarks/many_groups_rounds.py                    # draws 0-29
    python3 benchmarks/many_groups_rounds.py --draws 100:140    # others
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import fedglmm  # noqa: E402

FAMILIES = ("binomial", "poisson", "negative_binomial", "gamma/log", "gamma/inverse")


def draw(i: int) -> tuple[dict, str, dict]:
    rng = np.random.default_rng(1000 + i)
    shape = {"family": FAMILIES[i % len(FAMILIES)], "sites": int(rng.integers(2, 7)),
             "groups/site": int(rng.choice([100, 150, 250, 400])), "rows/group": int(rng.choice([10, 15, 25, 40])),
             "slope": bool(rng.random() < 0.4), "SD": float(rng.choice([0.3, 0.8, 1.2, 2.0]))}
    G, m = shape["sites"] * shape["groups/site"], shape["rows/group"]
    g = np.repeat(np.arange(G), m)
    x, w = rng.standard_normal(G * m), rng.standard_normal(G)[g]
    b = rng.normal(0, shape["SD"], G)[g] + (rng.normal(0, 0.4, G)[g] * x if shape["slope"] else 0.0)
    fam = shape["family"].split("/")[0]
    eta = (-0.8 if fam == "binomial" else 0.3) + 0.5 * x - 0.3 * w + b
    mu = np.exp(eta)
    if fam == "binomial":
        y = (rng.random(G * m) < 1 / (1 + np.exp(-eta))).astype(float)
    elif fam == "poisson":
        y = rng.poisson(mu).astype(float)
    elif fam == "negative_binomial":
        y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
    else:
        y = rng.gamma(4.0, mu / 4.0)
    df = pd.DataFrame({"y": y, "x": x, "w": w, "g": g})
    sites = {f"s{k}": d.reset_index(drop=True) for k, d in df.groupby(g % shape["sites"])}
    formula = "y ~ x + w + " + ("(1 + x | g)" if shape["slope"] else "(1 | g)")
    return shape, formula, sites


def difference(a, b) -> float:
    out = max(float(np.max(np.abs(a.fixef.to_numpy() - b.fixef.to_numpy()))),
              float(np.max(np.abs(np.asarray(a.theta) - np.asarray(b.theta)))),
              abs(a.loglik - b.loglik) / max(1.0, abs(b.loglik)))
    sa, sb = a.condsd, b.condsd.loc[a.condsd.index]
    return max(out, float(np.max(np.abs(sa.to_numpy() - sb.to_numpy()) / np.abs(sb.to_numpy()))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", default="0:30")
    args = ap.parse_args()
    lo, hi = (int(v) for v in args.draws.split(":"))
    print(f"{'draw':>4} {'family':18s} {'sites':>5} {'groups':>6} {'rows':>4} {'slope':>5} {'SD':>4} "
          f"{'hybrid':>6} {'iter':>4} {'diff':>8}")
    rounds, worst, t0 = [], 0.0, time.perf_counter()
    for i in range(lo, hi):
        shape, formula, sites = draw(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fam, _, link = shape["family"].partition("/")
                h = fedglmm.fit(formula, sites, family=fam, link=link or None)
                it = fedglmm.fit(formula, sites, family=fam, link=link or None, method="iterative")
            except fedglmm.FedGLMMError as exc:
                print(f"{i:4d} {shape['family']:18s} error: {exc}")
                continue
        d = difference(h, it)
        worst = max(worst, d)
        rounds.append(h.rounds)
        print(f"{i:4d} {shape['family']:18s} {shape['sites']:5d} {shape['groups/site']:6d} {shape['rows/group']:4d} "
              f"{str(shape['slope']):>5} {shape['SD']:4.1f} {h.rounds:6d} {it.rounds:4d} {d:8.1e}")
    r = np.array(rounds)
    print(f"{len(r)} fits in {time.perf_counter() - t0:.0f} s: hybrid rounds {r.sum()} in all, "
          f"median {np.median(r):g}, max {r.max()}, above 3 in {(r > 3).sum()}, above 4 in {(r > 4).sum()}; "
          f"largest difference from the iterative fit {worst:.1e}")


if __name__ == "__main__":
    main()
