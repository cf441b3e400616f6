#!/usr/bin/env python3
"""A sweep of randomly drawn data shapes -- family, sites, groups per site, rows per group, a factor, a
random slope, the random-effect SD, rare outcomes -- fitted by the default method and by the iterative one:
rounds, agreement and errors, tabulated by each characteristic.

usage: python3 benchmarks/shape_sweep.py [--draws 0:60] [--list] [--family gamma] [--gamma-link inverse]

Each draw (numpy default_rng([draw, 4242])): family binomial (40 %), poisson (30 %; a third of the draws
overdispersed by a gamma multiplier per row), negative binomial (ϑ = 2) or Gamma (shape 4, log link) (15 %
each); 2, 3, 5, 10, 30 or 60 sites of 1, 3,
10 or 40 groups (at least 6 groups in all) of Poisson(m) rows, m = 4, 8, 25 or 100 (at most 60,000 rows);
x, x2 ~ N(0, 1) per row and z ~ N(0, 1) per group with slopes 0.5, −0.3, 0.3; in half the draws a factor of
3 or 6 levels (effects −0.6..0.6); a random intercept of SD 0.3, 0.8, 1.5 or 2.5 and in 35 % of draws a
random slope of x (SD 0.4), fitted as ``(1 + x | g)``; intercepts −0.5, −2 or −3.5 (binary: rare outcomes)
and −1, 0.5 or 2 (poisson).  Groups go to sites by label (g mod sites) or in blocks.  Default site rules.
Per characteristic the table gives: fits, how many took more than 4 rounds, the mean rounds of both
methods.  ``--list`` also prints every draw; ``--family`` keeps one family's draws, ``--gamma-link``
fits the Gamma draws with another link than their data's log (glmer's default is the inverse).  Data of
this kind are far from the reference cases: tiny sites (1-3 groups of 4 rows), factors with rare levels,
separation (which both methods end as not converged, naming what runs off) -- a map of where the rounds
go, not a target.
"""
from __future__ import annotations

import argparse
import collections
import time
import warnings

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.errors import FedGLMMError


def draw(seed: int):
    rng = np.random.default_rng([seed, 4242])
    fam = str(rng.choice(["binomial", "poisson", "negative_binomial", "gamma"], p=[0.4, 0.3, 0.15, 0.15]))
    S, gps = int(rng.choice([2, 3, 5, 10, 30, 60])), int(rng.choice([1, 3, 10, 40]))
    m = int(rng.choice([4, 8, 25, 100]))
    if S * gps * m > 60000:
        m = max(4, 60000 // (S * gps))
    if S * gps < 6:
        gps = int(np.ceil(6 / S))
    G = S * gps
    sizes = np.maximum(2, rng.poisson(m, G))
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    x, x2, z = rng.normal(size=n), rng.normal(size=n), rng.normal(size=G)[g]
    nlev = int(rng.choice([0, 0, 3, 6]))
    f = rng.integers(0, nlev, n) if nlev else None
    slope = bool(rng.random() < 0.35)
    sd = float(rng.choice([0.3, 0.8, 1.5, 2.5]))
    b0, b1 = rng.normal(0, sd, G), (rng.normal(0, 0.4, G) if slope else np.zeros(G))
    base = {"binomial": float(rng.choice([-0.5, -2.0, -3.5])), "poisson": float(rng.choice([-1.0, 0.5, 2.0])),
            "negative_binomial": 0.5, "gamma": 1.0}[fam]
    eta = base + 0.5 * x - 0.3 * x2 + 0.3 * z + b0[g] + b1[g] * x
    if nlev:
        eta = eta + np.linspace(-0.6, 0.6, nlev)[f]
    mu = np.exp(eta)
    if fam == "binomial":
        y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    elif fam == "poisson":
        y = rng.poisson(mu * (rng.gamma(2.0, 0.5, n) if rng.random() < 0.3 else 1.0)).astype(float)
    elif fam == "negative_binomial":
        y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
    else:
        y = rng.gamma(4.0, mu / 4.0)
    df = pd.DataFrame({"y": y, "x": x, "x2": x2, "z": z, "g": g})
    rhs = "x + x2 + z"
    if nlev:
        df["f"] = np.array(list("abcdef"))[f]
        rhs += " + f"
    formula = f"y ~ {rhs} + " + ("(1 + x | g)" if slope else "(1 | g)")
    site = g % S if rng.choice(["mod", "block"]) == "mod" else (g * S) // G
    data = {f"s{i:02d}": df[site == i].reset_index(drop=True) for i in range(S) if np.any(site == i)}
    return formula, fam, data, {"family": fam, "sites": S, "groups/site": gps, "rows/group": m,
                                "factor levels": nlev, "slope": slope, "SD": sd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", default="0:60")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--family", default=None, help="only this family's draws")
    ap.add_argument("--gamma-link", default="log", choices=["log", "inverse", "identity"])
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    lo, hi = map(int, args.draws.split(":"))
    rows, errors, worst = [], [], 0.0
    t0 = time.perf_counter()
    for seed in range(lo, hi):
        formula, fam, data, desc = draw(seed)
        if args.family and fam != args.family:
            continue
        try:
            link = args.gamma_link if fam == "gamma" else None
            res = fedglmm.fit(formula, data, family=fam, link=link)
            it = fedglmm.fit(formula, data, family=fam, link=link, method="iterative")
        except FedGLMMError as exc:
            errors.append((seed, str(exc)[:120], desc))
            continue
        both = res.converged and it.converged
        if both:
            worst = max(worst, float(np.max(np.abs(res.fixef.to_numpy() - it.fixef.to_numpy())
                                            / np.maximum(1.0, np.abs(it.fixef.to_numpy())))))
        rows.append({**desc, "rounds": res.rounds, "iterative": it.rounds, "converged": both})
        if args.list:
            print(seed, res.rounds, it.rounds, both, desc, flush=True)
    fits = [r for r in rows if r["converged"]]
    print(f"{len(rows) + len(errors)} draws in {time.perf_counter() - t0:.0f} s: {len(fits)} converged, "
          f"{len(rows) - len(fits)} ended not converged (estimates that run off), {len(errors)} errors; "
          f"above 4 rounds {sum(r['rounds'] > 4 for r in fits)} of {len(fits)}; largest relative difference "
          f"of the fixed effects from the iterative fit {worst:.1e}")
    for key in ("family", "sites", "groups/site", "rows/group", "factor levels", "slope", "SD"):
        table = collections.defaultdict(list)
        for r in fits:
            table[r[key]].append(r)
        print(f"\n| {key} | fits | > 4 rounds | mean rounds | mean iterative |\n|---|---|---|---|---|")
        for value in sorted(table, key=str):
            rs = table[value]
            print(f"| {value} | {len(rs)} | {sum(r['rounds'] > 4 for r in rs)} | "
                  f"{np.mean([r['rounds'] for r in rs]):.1f} | {np.mean([r['iterative'] for r in rs]):.1f} |")
    for seed, msg, desc in errors:
        print(f"draw {seed}: {msg} {desc}")


if __name__ == "__main__":
    main()
