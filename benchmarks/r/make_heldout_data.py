#!/usr/bin/env python3
"""Make the data sets of the held-out group `data` (tests/data/heldout/data/): a simulated set for formula
transforms (poly, scale, centring) and copies of public sets with 1 % of model cells set to NA.

usage (from the repo root, after Rscript benchmarks/r/export_heldout_public.R):
    python3 benchmarks/r/make_heldout_data.py [outdir]
numpy default_rng with the fixed seeds below (truth and seeds also in tests/data/SOURCES.md).
NA cells are written as the string NA (R's read.csv and pandas both read it as missing, also in text columns).
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/heldout/data")


def labels(n, prefix):
    w = len(str(n))
    return np.array([f"{prefix}{i + 1:0{w}d}" for i in range(n)])


def save(df, name):
    path = OUT / f"{name}.csv"
    df.to_csv(path, index=False, na_rep="NA")
    print(path, len(df), "rows", path.stat().st_size, "bytes")


def sim_transform(seed=20250301):
    # 40 groups x U{10..40} rows; age ~ U(20, 85) (2 decimals), dose ~ U{0..500} (integer mg);
    # log mu = 1.0 + 0.02 (age - 50) - 0.0004 (age - 50)^2 + 0.002 (dose - 250) + b, b ~ N(0, 0.4^2);
    # y ~ Poisson(mu). Raw scales on purpose: the formulas centre, scale or orthogonalise them.
    rng = np.random.default_rng(seed)
    G = 40
    sizes = rng.integers(10, 41, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 0.4, size=G)
    age = np.round(rng.uniform(20.0, 85.0, size=n), 2)
    dose = rng.integers(0, 501, size=n)
    a = age - 50.0
    y = rng.poisson(np.exp(1.0 + 0.02 * a - 0.0004 * a**2 + 0.002 * (dose - 250) + b[g]))
    save(pd.DataFrame({"g": labels(G, "g")[g], "age": age, "dose": dose, "y": y}), "sim_transform")


def with_na(src, name, cols, split, seed, frac=0.01):
    # Set round(frac * rows * len(cols)) cells of the model columns `cols` to NA, chosen uniformly without
    # replacement among all rows x cols cells (MCAR). Prints the rows dropped by na.omit per `split` level.
    rng = np.random.default_rng(seed)
    d = pd.read_csv(OUT / f"{src}.csv")
    for c in d.columns:  # integers stay integers (nullable) when a cell becomes NA
        if pd.api.types.is_integer_dtype(d[c]):
            d[c] = d[c].astype("Int64")
    n, k = len(d), len(cols)
    m = int(round(frac * n * k))
    cells = rng.choice(n * k, size=m, replace=False)
    orig_split = d[split].copy()
    for c in cells:
        d.iloc[c // k, d.columns.get_loc(cols[c % k])] = np.nan
    save(d, name)
    dropped = d[cols].isna().any(axis=1)
    print(f"  {m} NA cells; {int(dropped.sum())} rows dropped, {n - int(dropped.sum())} used;",
          "NA per column:", {c: int(d[c].isna().sum()) for c in cols})
    per = orig_split[dropped].value_counts().sort_index()
    print("  dropped per", split, "(the row's original level; NA in the split column itself:",
          int(d[split].isna().sum()), "rows):", ", ".join(f"{k} {v}" for k, v in per.items()))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sim_transform()
    with_na("contraception", "contraception_na", ["use", "urban", "age", "livch", "district"], "district", 20250302)
    with_na("grouseticks", "grouseticks_na", ["TICKS", "YEAR", "cHEIGHT", "LOCATION"], "LOCATION", 20250303)
    with_na("sleepstudy", "sleepstudy_na", ["Reaction", "Days", "Subject"], "Subject", 20250304)
