#!/usr/bin/env python3
"""Fit time of every reference case (tests/data/shared_cases.tsv and extra_cases.tsv) by a method, pooled
and split over 3 sites as in the golden file (tests/golden.py): the median of ``res.seconds`` over
--repeat fits after one warm-up fit, with the rounds.

usage: python3 benchmarks/time_reference.py [--method hybrid] [--repeat 3] [--json OUT]

To compare two checkouts, run it under each (e.g. ``PYTHONPATH=/path/to/other/src``) with --json and
compare the files with --against OLD.json (prints new/old per fit and the largest ratio).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="hybrid")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--against")
    args = ap.parse_args()
    import fedglmm
    from golden import _split, cases

    old = json.loads(Path(args.against).read_text()) if args.against else {}
    out, worst = {}, 0.0
    print(f"fedglmm from {fedglmm.__file__}")
    print(f"{'fit':40s} {'rounds':>6s} {'seconds':>9s}" + ("  old rounds  old s   new/old" if old else ""))
    for case in cases():
        df = pd.read_csv(case["data"])
        kw = {"weights": case["weights"]} if case["weights"] else {}
        for label, data in (("pooled", df), ("3 sites", _split(df, case["formula"]))):
            key = f"{case['name']} {label}"
            times, rounds = [], None
            try:
                for _ in range(args.repeat + 1):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = fedglmm.fit(case["formula"], data, family=case["family"], link=case["link"],
                                          nagq=case["nagq"], reml=case["reml"], method=args.method, **kw)
                    times.append(res.seconds)
                    rounds = res.rounds
            except Exception as exc:        # noqa: BLE001 -- a case this checkout cannot fit
                print(f"{key:40s} error: {str(exc)[:60]}")
                continue
            t = statistics.median(times[1:])
            out[key] = {"seconds": t, "rounds": rounds}
            line = f"{key:40s} {rounds:6d} {t:9.3f}"
            if key in old:
                ratio = t / old[key]["seconds"]
                worst = max(worst, ratio)
                line += f"  {old[key]['rounds']:10d} {old[key]['seconds']:6.3f}  {ratio:7.2f}"
            print(line, flush=True)
    if old:
        print(f"largest new/old: {worst:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
