"""Parity on the held-out group `data` (tests/data/heldout/data): formula transforms and missing values.

For every case: the fit pooled (one site), split over 3 and 7 sites by the case's split column (rows whose
split value is missing go to the last site), by the iterative and the hybrid method.  Printed per fit:
rounds, bytes to/from the sites, the largest |Δβ| against the pooled fit of the same method, logLik minus
the better of the lme4 / glmmTMB references, the largest |β − reference| / SE (the nearer reference), the
largest relative SE difference, rows used and omitted, and seconds.

    python3 benchmarks/parity_data.py                 # every case
    python3 benchmarks/parity_data.py --only poly     # cases whose name matches a regex
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fedglmm  # noqa: E402
from heldout_data import cases, split  # noqa: E402
from reference import full_loglik, r_name  # noqa: E402


def _parity(res, case) -> tuple[float, float, float]:
    refs = case["refs"]
    dll = res.loglik - max(full_loglik(r, case) for r in refs)
    dbeta, dse = 0.0, 0.0
    for name, est in res.fixef.items():
        rn = r_name(name)
        dbeta = max(dbeta, min(abs(est - r["fixef"][rn]) / r["se"][rn] for r in refs if rn in r["fixef"]))
        dse = max(dse, min(abs(res.se[name] - r["se"][rn]) / r["se"][rn] for r in refs if rn in r["se"]))
    return dll, dbeta, dse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="regex on case names")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    head = (f"{'case':24s} {'method':9s} {'sites':>5s} {'rounds':>6s} {'bytes to/from':>15s} {'|Δβ| pooled':>11s} "
            f"{'ΔlogLik':>9s} {'Δβ/SE':>6s} {'ΔSE':>6s} {'n':>5s} {'omit':>4s} {'s':>5s}")
    print(head)
    print("-" * len(head))
    for name, case in cases().items():
        if args.only and not re.search(args.only, name):
            continue
        df = pd.read_csv(case["data"])
        kw = dict(family=case["family"], nagq=case["nagq"], reml=case["reml"])
        for method in ("iterative", "hybrid"):
            pooled = None
            for k in (1, 3, 7):
                data = df if k == 1 else split(df, case["split"], k)
                t0 = time.perf_counter()
                res = fedglmm.fit(case["formula"], data, method=method, **kw)
                secs = time.perf_counter() - t0
                pooled = pooled if pooled is not None else res
                dpool = float(np.max(np.abs(res.fixef.to_numpy() - pooled.fixef.to_numpy())))
                dll, dbeta, dse = _parity(res, case)
                print(f"{name:24s} {method:9s} {k:5d} {res.rounds:6d} "
                      f"{f'{res.bytes_to_sites}/{res.bytes_from_sites}':>15s} {dpool:11.1e} {dll:9.1e} "
                      f"{dbeta:6.3f} {dse:6.3f} {res.nobs:5d} {sum(res.omitted.values()):4d} {secs:5.2f}")


if __name__ == "__main__":
    main()
