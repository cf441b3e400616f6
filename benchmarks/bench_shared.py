"""Shared grouping factors (levels at several sites): bytes per site per round against dim(v) and rows,
and rounds, time and pooled-fit agreement on the held-out shared cases.

Table 1 (simulated, crossed gaussian): respondents local to one of 4 sites, items shared by every site,
``y ~ x + (1 | id) + (1 | item)``; dim(v) = number of items, rows per site varied at fixed dim(v).  Bytes
are those of the ``evaluate`` replies (one per Newton round), per site.

Table 2 (held-out, ``tests/data/heldout/multilevel``): each gaussian shared case split by its own site
column, fitted by the default (hybrid) and iterative methods, against the fit of the pooled rows on one
site: rounds, seconds, |ΔlogLik|, max |Δβ| / SE.

Table 3: the same for binary and count models (Laplace), ``y ~ x + (1 | id) + (1 | item)`` binomial as
in table 1 (bytes per site per ``evaluate`` round, and per point: a round carries 1 + 2·dim(φ) points
for each trial φ, 1 to 3 trial φs, and 3 more points while v is far from its mode; the ratio is that of
bytes per point), then the held-out binomial and poisson shared cases (``sim_crossed_binom_la`` split
over 4 sites by rater, so that all 30 items are shared).

    python3 benchmarks/bench_shared.py            # all tables (a few minutes on 2 cores)
    python3 benchmarks/bench_shared.py --no-heldout
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fedglmm.api import fit_on  # noqa: E402
from fedglmm.site import Site  # noqa: E402
from fedglmm.transport.inprocess import InProcessTransport  # noqa: E402

HELDOUT = ("sim_teachers_reml", "sim_teachers_ml", "scotssec_reml", "scotssec_ml", "insteval_reml", "insteval_ml")
HELDOUT_GLMM = ("verbagg_la", "verbagg_dif", "sim_crossed_binom_la", "sim_doctors_la", "sim_items_pois",
                "sim_items_pois_slope")
SPLIT = {"sim_crossed_binom_la": ("rater", 4)}       # no site column: 4 sites by rater, every item shared


def simulate(items: int, per_site: int, sites: int = 4, seed: int = 1, binary: bool = False) -> dict:
    """``per_site`` rows at each site: respondents of 6 rows each, every row a random shared item."""
    rng = np.random.default_rng(seed)
    out = {}
    item_effect = rng.normal(0, 0.8, items)
    for s in range(sites):
        ids = np.repeat(np.arange(per_site // 6 + 1), 6)[:per_site]
        item = rng.integers(0, items, per_site)
        item[:items] = np.arange(items)                       # every item at every site
        x = rng.normal(size=per_site)
        y = 1 + 0.5 * x + rng.normal(0, 1, ids.max() + 1)[ids] + item_effect[item] + rng.normal(size=per_site)
        if binary:
            y = (y - 1.0 > 0).astype(float)
        out[f"s{s}"] = pd.DataFrame({"y": y, "x": x, "id": [f"{s}-{i}" for i in ids],
                                     "item": [f"i{i:03d}" for i in item]})
    return out


class _Counting(InProcessTransport):
    """Counts the points of each ``evaluate`` request."""

    def broadcast(self, message):
        if message.get("kind") == "evaluate":
            self.points.append(len(message["points"]))
        return super().broadcast(message)


def evaluate_bytes(frames: dict, formula: str, family: str = "gaussian") -> tuple[float, int, float, float]:
    """(mean bytes per site per evaluate round, evaluate rounds, seconds, mean bytes per site per point)."""
    sites = {sid: Site(sid, df, min_group=1) for sid, df in frames.items()}
    per_round = []
    state = {"last": 0}

    def on_round(_, kind):
        now = transport.bytes_from_sites
        if kind == "evaluate":
            per_round.append((now - state["last"]) / len(sites))
        state["last"] = now

    transport = _Counting(sites, on_round=on_round)
    transport.points = []
    t0 = time.perf_counter()
    fit_on(transport, formula, family=family, method="iterative")
    per_point = float(np.sum(per_round) / np.sum(transport.points))
    return float(np.mean(per_round)), len(per_round), time.perf_counter() - t0, per_point


def table_bytes() -> None:
    print("Table 1: bytes per site per evaluate round, y ~ x + (1 | id) + (1 | item), 4 sites, items shared")
    print(f"{'dim(v)':>7} {'rows/site':>10} {'bytes/site/round':>17} {'(dim(v)+p+1)^2':>15} {'ratio':>7} "
          f"{'rounds':>7} {'s':>6}")
    for items, rows in ((10, 600), (10, 2400), (10, 9600), (20, 2400), (40, 2400), (80, 2400), (160, 2400)):
        b, rounds, sec, _ = evaluate_bytes(simulate(items, rows), "y ~ x + (1 | id) + (1 | item)")
        width = (items + 2 + 1) ** 2
        print(f"{items:>7} {rows:>10} {b:>17,.0f} {width:>15,} {b / width:>7.1f} {rounds:>7} {sec:>6.1f}")


def table_heldout() -> None:
    from multilevel_reference import cases, split_sites

    table = {c["name"]: c for c in cases("heldout")}
    print("\nTable 2: held-out shared gaussian cases split by their site column, against the pooled fit")
    print(f"{'case':<18} {'sites':>5} {'dim(v)':>6} {'method':<9} {'rounds':>6} {'s':>6} {'bytes/site/rnd':>14} "
          f"{'|dlogLik|':>10} {'max|db|/SE':>11} {'lme4 parity':>12}")
    for name in HELDOUT:
        _split_rows(table[name], split_sites(table[name]), 18)


def table_glmm(heldout: bool = True) -> None:
    print("\nTable 3a: bytes per site per evaluate round, binomial y ~ x + (1 | id) + (1 | item), 4 sites, items shared")
    print(f"{'dim(v)':>7} {'rows/site':>10} {'bytes/site/round':>17} {'bytes/site/point':>17} "
          f"{'(dim(v)+p+k)^2':>15} {'ratio':>7} {'rounds':>7} {'s':>6}")
    for items, rows in ((10, 600), (10, 2400), (10, 9600), (20, 2400), (40, 2400), (80, 2400)):
        b, rounds, sec, per = evaluate_bytes(simulate(items, rows, binary=True), "y ~ x + (1 | id) + (1 | item)",
                                             "binomial")
        width = (items + 2 + 2) ** 2
        print(f"{items:>7} {rows:>10} {b:>17,.0f} {per:>17,.0f} {width:>15,} {per / width:>7.1f} {rounds:>7} "
              f"{sec:>6.1f}")
    if not heldout:
        return
    from multilevel_reference import cases, split_sites

    table = {c["name"]: c for c in cases("heldout")}
    print("\nTable 3b: held-out shared binomial and poisson cases split over sites, against the pooled fit")
    print(f"{'case':<21} {'sites':>5} {'dim(v)':>6} {'method':<9} {'rounds':>6} {'s':>6} {'bytes/site/rnd':>14} "
          f"{'|dlogLik|':>10} {'max|db|/SE':>11} {'lme4 parity':>12}")
    for name in HELDOUT_GLMM:
        col, k = SPLIT.get(name, (table[name]["split"], None))
        _split_rows(table[name], split_sites(dict(table[name], split=col), k), 21)


def _split_rows(case: dict, parts: dict, width: int) -> None:
    """One row per method: the case fitted over ``parts`` against its pooled iterative fit (rounds, seconds,
    bytes per site per round, |ΔlogLik|, max |Δβ|/SE) and the lme4 parity rules."""
    from multilevel_reference import compare, fit

    pooled = fit(case, method="iterative", min_group=1)
    for method in ("hybrid", "iterative"):
        t0 = time.perf_counter()
        res = fit(case, data=parts, method=method, min_group=1)
        sec = time.perf_counter() - t0
        dll = abs(res.loglik - pooled.loglik)
        db = float(np.max(np.abs(res.fixef - pooled.fixef) / pooled.se))
        ok = "ok" if not compare(res, case) else "; ".join(compare(res, case))
        per = res.bytes_from_sites / (res.rounds * len(parts))
        print(f"{case['name']:<{width}} {len(parts):>5} {_dim(res):>6} {method:<9} {res.rounds:>6} {sec:>6.1f} "
              f"{per:>14,.0f} {dll:>10.1e} {db:>11.1e} {ok:>12}")


def _dim(res) -> int:
    """dim(v) from the summary's note on shared levels ("teacher: 178 of 400 levels ...")."""
    import re

    note = next((m for m in res.messages if m.startswith("levels shared by sites")), "")
    return sum(int(k) for k in re.findall(r": (\d+) of \d+ levels", note))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-heldout", action="store_true")
    args = ap.parse_args()
    table_bytes()
    if not args.no_heldout:
        table_heldout()
    table_glmm(not args.no_heldout)


if __name__ == "__main__":
    main()
