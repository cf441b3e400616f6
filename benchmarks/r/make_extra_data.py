#!/usr/bin/env python3
"""Simulate the extra_sim_* data sets in tests/data (numpy, seeded; truth recorded in tests/data/SOURCES.md).

usage: python3 benchmarks/r/make_extra_data.py [outdir=tests/data]
Group labels are zero-padded strings ("g001") so R's alphabetical factor order equals numeric order;
categorical columns are strings so both R (factor) and pandas treat them as categorical.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
FMT = "%.6f"


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def labels(n, prefix="g"):
    w = len(str(n))
    return np.array([f"{prefix}{i + 1:0{w}d}" for i in range(n)])


def save(df, name):
    path = OUT / f"extra_{name}.csv"
    df.to_csv(path, index=False, float_format=FMT)
    print(path, len(df), "rows", path.stat().st_size, "bytes")


def sim_pois_offset(seed=20240601):
    # 60 groups, 10..20 rows each (mean ~15); y ~ Poisson(t exp(0.3 + 0.5 x + b)), b ~ N(0, 0.6^2)
    rng = np.random.default_rng(seed)
    G = 60
    sizes = rng.integers(10, 21, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 0.6, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    t = np.round(rng.uniform(0.5, 3.0, size=n), 6)
    y = rng.poisson(t * np.exp(0.3 + 0.5 * x + b[g]))
    save(pd.DataFrame({"g": labels(G)[g], "x": x, "t": t, "y": y}), "sim_pois_offset")


def sim_logit_uncorr(seed=20240602):
    # 80 groups x 40 rows; eta = -0.3 + 0.8 x1 + 0.5 [x2 == "b"] + b0 + b1 x1, b0 ~ N(0, 0.8^2), b1 ~ N(0, 0.5^2) indep.
    rng = np.random.default_rng(seed)
    G, m = 80, 40
    g = np.repeat(np.arange(G), m)
    n = g.size
    b0 = rng.normal(0.0, 0.8, size=G)
    b1 = rng.normal(0.0, 0.5, size=G)
    x1 = np.round(rng.normal(0.0, 1.0, size=n), 6)
    x2b = rng.random(n) < 0.4
    eta = -0.3 + 0.8 * x1 + 0.5 * x2b + b0[g] + b1[g] * x1
    y = (rng.random(n) < expit(eta)).astype(int)
    save(pd.DataFrame({"g": labels(G)[g], "x1": x1, "x2": np.where(x2b, "b", "a"), "y": y}),
         "sim_logit_uncorr")


def sim_logit_slope(seed=20240603):
    # 50 groups x 30 rows; eta = -0.2 + 0.7 x1 + b0 + b1 x1, (b0, b1) ~ N(0, sds (1.0, 0.6), corr 0.4)
    rng = np.random.default_rng(seed)
    G, m = 50, 30
    g = np.repeat(np.arange(G), m)
    n = g.size
    sd = np.array([1.0, 0.6])
    R = np.array([[1.0, 0.4], [0.4, 1.0]])
    S = R * np.outer(sd, sd)
    b = rng.multivariate_normal(np.zeros(2), S, size=G)
    x1 = np.round(rng.normal(0.0, 1.0, size=n), 6)
    eta = -0.2 + 0.7 * x1 + b[g, 0] + b[g, 1] * x1
    y = (rng.random(n) < expit(eta)).astype(int)
    save(pd.DataFrame({"g": labels(G)[g], "x1": x1, "y": y}), "sim_logit_slope")


def sim_gauss_factor(seed=20240604):
    # 40 groups x 12 rows; y = 10 + 2 x + 1.5 [f=b] - 1.0 [f=c] + 0.8 x[f=b] - 0.5 x[f=c] + b + e,
    # b ~ N(0, 1.5^2), e ~ N(0, 2^2); x ~ N(0,1), f uniform on {a, b, c}
    rng = np.random.default_rng(seed)
    G, m = 40, 12
    g = np.repeat(np.arange(G), m)
    n = g.size
    b = rng.normal(0.0, 1.5, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    f = rng.choice(np.array(["a", "b", "c"]), size=n)
    fb, fc = (f == "b"), (f == "c")
    mu = 10 + 2 * x + 1.5 * fb - 1.0 * fc + 0.8 * x * fb - 0.5 * x * fc + b[g]
    y = np.round(mu + rng.normal(0.0, 2.0, size=n), 6)
    save(pd.DataFrame({"g": labels(G)[g], "x": x, "f": f, "y": y}), "sim_gauss_factor")


def sim_pois_big(seed=20240605):
    # 300 groups x 20 rows; y ~ Poisson(exp(0.5 + 0.4 x1 - 0.3 x2 + b)), b ~ N(0, 0.5^2), x1, x2 ~ N(0,1)
    # site: s1..s6, 50 consecutive groups each (groups nested in sites) for splitting tests; not in the model.
    rng = np.random.default_rng(seed)
    G, m = 300, 20
    g = np.repeat(np.arange(G), m)
    n = g.size
    b = rng.normal(0.0, 0.5, size=G)
    x1 = np.round(rng.normal(0.0, 1.0, size=n), 4)
    x2 = np.round(rng.normal(0.0, 1.0, size=n), 4)
    y = rng.poisson(np.exp(0.5 + 0.4 * x1 - 0.3 * x2 + b[g]))
    site = np.array([f"s{k + 1}" for k in range(6)])[g // 50]
    df = pd.DataFrame({"site": site, "g": labels(G)[g], "x1": x1, "x2": x2, "y": y})
    df.to_csv(OUT / "extra_sim_pois_big.csv", index=False, float_format="%.4f")
    p = OUT / "extra_sim_pois_big.csv"
    print(p, len(df), "rows", p.stat().st_size, "bytes")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sim_pois_offset()
    sim_logit_uncorr()
    sim_logit_slope()
    sim_gauss_factor()
    sim_pois_big()
