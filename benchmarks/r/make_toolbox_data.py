#!/usr/bin/env python3
"""Simulate the held-out data sets for the toolbox references (tests/data/toolbox/toolbox_sim_*.csv).

usage: python3 benchmarks/r/make_toolbox_data.py [outdir=tests/data/toolbox]
numpy default_rng with fixed seeds; the truth of every set is in its function's comment and in
tests/data/toolbox/README.md. Labels are zero-padded strings ("g01") so R's alphabetical factor order
equals numeric order; categorical columns are strings, so R (factor) and pandas treat them as categorical.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/toolbox")
FMT = "%.6f"


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def labels(n, prefix="g"):
    w = len(str(n))
    return np.array([f"{prefix}{i + 1:0{w}d}" for i in range(n)])


def save(df, name):
    path = OUT / f"toolbox_sim_{name}.csv"
    df.to_csv(path, index=False, float_format=FMT)
    print(path, len(df), "rows", path.stat().st_size, "bytes")


def sim_hosp8(seed=20240701):
    # Multi-centre trial, 8 hospitals with 15..40 patients each; treatment assigned by hospital (4 + 4).
    # y = 20 + 2.0 [arm = treated] + 1.5 x + b_h + e, b_h ~ N(0, 1.5^2), e ~ N(0, 3^2), x ~ N(0, 1).
    rng = np.random.default_rng(seed)
    H = 8
    sizes = rng.integers(15, 41, size=H)
    treated = rng.permutation(np.repeat([False, True], H // 2))
    h = np.repeat(np.arange(H), sizes)
    n = h.size
    b = rng.normal(0.0, 1.5, size=H)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    mu = 20 + 2.0 * treated[h] + 1.5 * x + b[h]
    y = np.round(mu + rng.normal(0.0, 3.0, size=n), 6)
    arm = np.where(treated[h], "treated", "control")
    save(pd.DataFrame({"hospital": labels(H, "h")[h], "arm": arm, "x": x, "y": y}), "hosp8")


def sim_logit30(seed=20240702):
    # Logistic, 30 groups of 20..60 rows; eta = -0.5 + 0.8 x + 0.6 [z = b] + b, b ~ N(0, 0.9^2).
    rng = np.random.default_rng(seed)
    G = 30
    sizes = rng.integers(20, 61, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 0.9, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    zb = rng.random(n) < 0.5
    eta = -0.5 + 0.8 * x + 0.6 * zb + b[g]
    y = (rng.random(n) < expit(eta)).astype(int)
    save(pd.DataFrame({"g": labels(G)[g], "x": x, "z": np.where(zb, "b", "a"), "y": y}), "logit30")


def sim_long(seed=20240703):
    # Longitudinal: 40 subjects (20 per arm) x visits at time 0..5, each visit after time 0 missing w.p. 0.15.
    # y = 100 + 5 time - 2 [arm = B] - 1.5 time [arm = B] + b0 + b1 time + e,
    # (b0, b1): sds (8, 2), correlation 0.3; e ~ N(0, 5^2).
    rng = np.random.default_rng(seed)
    S, T = 40, 6
    armB = rng.permutation(np.repeat([False, True], S // 2))
    sd = np.array([8.0, 2.0])
    R = np.array([[1.0, 0.3], [0.3, 1.0]])
    b = rng.multivariate_normal(np.zeros(2), R * np.outer(sd, sd), size=S)
    s = np.repeat(np.arange(S), T)
    t = np.tile(np.arange(T), S)
    keep = (t == 0) | (rng.random(S * T) >= 0.15)
    s, t = s[keep], t[keep]
    n = s.size
    mu = 100 + 5 * t - 2 * armB[s] - 1.5 * t * armB[s] + b[s, 0] + b[s, 1] * t
    y = np.round(mu + rng.normal(0.0, 5.0, size=n), 6)
    save(pd.DataFrame({"id": labels(S, "s")[s], "arm": np.where(armB[s], "B", "A"), "time": t, "y": y}),
         "long")


def sim_unbal(seed=20240704):
    # Unbalanced: 25 groups of 2..30 rows; dose in {d0, d1, d2} per row with probabilities (0.5, 0.3, 0.2);
    # x ~ N(0, 1) per row, w ~ N(0, 1) per group.
    # y = 5 + 1.0 [dose = d1] + 2.0 [dose = d2] + 0.5 x + 0.8 w + b + e, b ~ N(0, 1.2^2), e ~ N(0, 1.5^2).
    rng = np.random.default_rng(seed)
    G = 25
    sizes = rng.integers(2, 31, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 1.2, size=G)
    w = np.round(rng.normal(0.0, 1.0, size=G), 6)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    dose = rng.choice(np.array(["d0", "d1", "d2"]), size=n, p=[0.5, 0.3, 0.2])
    mu = 5 + 1.0 * (dose == "d1") + 2.0 * (dose == "d2") + 0.5 * x + 0.8 * w[g] + b[g]
    y = np.round(mu + rng.normal(0.0, 1.5, size=n), 6)
    save(pd.DataFrame({"g": labels(G)[g], "dose": dose, "x": x, "w": w[g], "y": y}), "unbal")


def sim_nested(seed=20240705):
    # 3 levels: 12 hospitals, 4..10 patients each, 2..6 visits per patient (time = 0, 1, ...);
    # treatment randomised per patient (p = 0.5). Patient labels are unique over hospitals ("h03p07").
    # y = 50 + 3 [trt = yes] + 1.0 time + b_h + b_p + e, b_h ~ N(0, 2^2), b_p ~ N(0, 3^2), e ~ N(0, 2^2).
    rng = np.random.default_rng(seed)
    H = 12
    npat = rng.integers(4, 11, size=H)
    hl = labels(H, "h")
    bh = rng.normal(0.0, 2.0, size=H)
    rows = []
    for i in range(H):
        for p in range(npat[i]):
            pid = f"{hl[i]}p{p + 1:02d}"
            trt = rng.random() < 0.5
            bp = rng.normal(0.0, 3.0)
            nv = rng.integers(2, 7)
            for t in range(nv):
                mu = 50 + 3.0 * trt + 1.0 * t + bh[i] + bp
                rows.append((hl[i], pid, "yes" if trt else "no", t, round(mu + rng.normal(0.0, 2.0), 6)))
    save(pd.DataFrame(rows, columns=["hospital", "patient", "trt", "time", "y"]), "nested")


def sim_anova_lmm(seed=20240706):
    # 30 groups x 8 rows; y = 3 + 1.0 x + 0.3 w + b0 + b1 x + e, b0 ~ N(0, 1), b1 ~ N(0, 0.5^2) independent,
    # e ~ N(0, 1); x, w ~ N(0, 1) per row.
    rng = np.random.default_rng(seed)
    G, m = 30, 8
    g = np.repeat(np.arange(G), m)
    n = g.size
    b0 = rng.normal(0.0, 1.0, size=G)
    b1 = rng.normal(0.0, 0.5, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    w = np.round(rng.normal(0.0, 1.0, size=n), 6)
    y = np.round(3 + 1.0 * x + 0.3 * w + b0[g] + b1[g] * x + rng.normal(0.0, 1.0, size=n), 6)
    save(pd.DataFrame({"g": labels(G)[g], "x": x, "w": w, "y": y}), "anova_lmm")


def sim_anova_glmm(seed=20240707):
    # Binomial counts: 40 groups x 6 rows, k successes of n ~ U{5..20} trials;
    # eta = -0.4 + 0.5 x + 0.4 [f = b] - 0.3 [f = c] + b, b ~ N(0, 0.7^2); f uniform on {a, b, c}.
    rng = np.random.default_rng(seed)
    G, m = 40, 6
    g = np.repeat(np.arange(G), m)
    N = g.size
    b = rng.normal(0.0, 0.7, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=N), 6)
    f = rng.choice(np.array(["a", "b", "c"]), size=N)
    trials = rng.integers(5, 21, size=N)
    eta = -0.4 + 0.5 * x + 0.4 * (f == "b") - 0.3 * (f == "c") + b[g]
    k = rng.binomial(trials, expit(eta))
    save(pd.DataFrame({"g": labels(G)[g], "x": x, "f": f, "n": trials, "k": k}), "anova_glmm")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sim_hosp8()
    sim_logit30()
    sim_long()
    sim_unbal()
    sim_nested()
    sim_anova_lmm()
    sim_anova_glmm()
