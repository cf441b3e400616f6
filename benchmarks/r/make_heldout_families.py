#!/usr/bin/env python3
"""Simulate the data sets of the held-out group `families` (tests/data/heldout/families/).

usage (from the repo root): python3 benchmarks/r/make_heldout_families.py [outdir]
numpy default_rng with the fixed seeds below; the truth is in each function's comment and in
tests/data/SOURCES.md. Labels are zero-padded strings (R's alphabetical factor order = numeric order);
categorical columns are non-numeric strings so R's read.csv and pandas both read them as categorical.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/heldout/families")
FMT = None  # values are rounded where made; prop = succ / trials keeps full precision


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def labels(n, prefix):
    w = len(str(n))
    return np.array([f"{prefix}{i + 1:0{w}d}" for i in range(n)])


def save(df, name):
    path = OUT / f"{name}.csv"
    df.to_csv(path, index=False, float_format=FMT)
    print(path, len(df), "rows", path.stat().st_size, "bytes")


def rnbinom(rng, mu, theta):
    # NB2: Var = mu + mu^2 / theta (R's rnbinom(size = theta, mu = mu))
    return rng.negative_binomial(theta, theta / (theta + mu))


def sim_nb_clinics(seed=20250101):
    # 40 clinics x U{5..60} patients; f in A/B/C/D (probs .4/.25/.2/.15), x ~ N(0,1);
    # log mu = 0.8 + 0.4 x + 0.3[B] - 0.4[C] + 0.6[D] + b, b ~ N(0, 0.5^2); y ~ NB2(mu, theta = 1.5)
    rng = np.random.default_rng(seed)
    G = 40
    sizes = rng.integers(5, 61, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 0.5, size=G)
    f = rng.choice(np.array(["A", "B", "C", "D"]), size=n, p=[0.4, 0.25, 0.2, 0.15])
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    eff = {"A": 0.0, "B": 0.3, "C": -0.4, "D": 0.6}
    mu = np.exp(0.8 + 0.4 * x + np.vectorize(eff.get)(f) + b[g])
    y = rnbinom(rng, mu, 1.5)
    save(pd.DataFrame({"clinic": labels(G, "c")[g], "f": f, "x": x, "y": y}), "sim_nb_clinics")


def sim_nb_slope(seed=20250102):
    # 60 groups x 25 rows; x ~ N(0,1); log mu = 1.0 + 0.5 x + b0 + b1 x, (b0, b1) sds (0.6, 0.3), corr 0.3;
    # y ~ NB2(mu, theta = 2)
    rng = np.random.default_rng(seed)
    G, m = 60, 25
    g = np.repeat(np.arange(G), m)
    n = g.size
    sd = np.array([0.6, 0.3])
    cov = np.outer(sd, sd) * np.array([[1.0, 0.3], [0.3, 1.0]])
    bb = rng.multivariate_normal(np.zeros(2), cov, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    mu = np.exp(1.0 + 0.5 * x + bb[g, 0] + bb[g, 1] * x)
    y = rnbinom(rng, mu, 2.0)
    save(pd.DataFrame({"g": labels(G, "g")[g], "x": x, "y": y}), "sim_nb_slope")


def stays(rng, H=30):
    # 30 hospitals x U{20..200} stays; age integer U{20..90}; sex F/M (.5); severity mild/moderate/severe
    # (probs .5/.35/.15)
    sizes = rng.integers(20, 201, size=H)
    h = np.repeat(np.arange(H), sizes)
    n = h.size
    age = rng.integers(20, 91, size=n)
    male = rng.random(n) < 0.5
    sev = rng.choice(np.array(["mild", "moderate", "severe"]), size=n, p=[0.5, 0.35, 0.15])
    return h, age, male, sev


def gamma_frame(rng, h, age, male, sev, mu, H=30, cv=0.6):
    shape = 1.0 / cv**2
    los = np.round(rng.gamma(shape, mu / shape), 6)
    los = np.maximum(los, 1e-6)  # keep strictly positive after rounding
    return pd.DataFrame({"hospital": labels(H, "h")[h], "age": age, "sex": np.where(male, "M", "F"),
                         "severity": sev, "los": los})


def sim_gamma_log(seed=20250103):
    # log mu = 1.2 + 0.01 (age - 50) + 0.1[M] + 0.4[moderate] + 0.9[severe] + b, b ~ N(0, 0.3^2);
    # los ~ Gamma(shape 1/0.6^2, mean mu) (CV 0.6)
    rng = np.random.default_rng(seed)
    h, age, male, sev = stays(rng)
    b = rng.normal(0.0, 0.3, size=30)
    s = {"mild": 0.0, "moderate": 0.4, "severe": 0.9}
    mu = np.exp(1.2 + 0.01 * (age - 50) + 0.1 * male + np.vectorize(s.get)(sev) + b[h])
    save(gamma_frame(rng, h, age, male, sev, mu), "sim_gamma_log")


def sim_gamma_inv(seed=20250104):
    # 1/mu = 0.25 - 0.001 (age - 50) - 0.02[M] - 0.05[moderate] - 0.1[severe] + b, b ~ N(0, 0.02^2),
    # 1/mu floored at 0.02 (not reached with this seed); los ~ Gamma(shape 1/0.6^2, mean mu)
    rng = np.random.default_rng(seed)
    h, age, male, sev = stays(rng)
    b = rng.normal(0.0, 0.02, size=30)
    s = {"mild": 0.0, "moderate": 0.05, "severe": 0.1}
    eta = 0.25 - 0.001 * (age - 50) - 0.02 * male - np.vectorize(s.get)(sev) + b[h]
    assert eta.min() > 0.02, eta.min()
    save(gamma_frame(rng, h, age, male, sev, 1.0 / eta), "sim_gamma_inv")


def sim_gamma_identity(seed=20250105):
    # mu = 4 + 0.05 (age - 50) + 0.5[M] + 1.5[moderate] + 3.5[severe] + b, b ~ N(0, 0.8^2),
    # mu floored at 0.5 (not reached with this seed); los ~ Gamma(shape 1/0.6^2, mean mu)
    rng = np.random.default_rng(seed)
    h, age, male, sev = stays(rng)
    b = rng.normal(0.0, 0.8, size=30)
    s = {"mild": 0.0, "moderate": 1.5, "severe": 3.5}
    mu = 4.0 + 0.05 * (age - 50) + 0.5 * male + np.vectorize(s.get)(sev) + b[h]
    assert mu.min() > 0.5, mu.min()
    save(gamma_frame(rng, h, age, male, sev, mu), "sim_gamma_identity")


def sim_binom_prop(seed=20250106):
    # 50 clinics x U{8..20} rows (a row = one ward-month); trials ~ U{5..40}; x ~ N(0,1); f A/B (.5);
    # logit p = -0.5 + 0.6 x + 0.4[B] + b, b ~ N(0, 0.7^2); succ ~ Bin(trials, p); prop = succ / trials
    rng = np.random.default_rng(seed)
    G = 50
    sizes = rng.integers(8, 21, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 0.7, size=G)
    trials = rng.integers(5, 41, size=n)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    fb = rng.random(n) < 0.5
    p = expit(-0.5 + 0.6 * x + 0.4 * fb + b[g])
    succ = rng.binomial(trials, p)
    save(pd.DataFrame({"clinic": labels(G, "c")[g], "x": x, "f": np.where(fb, "B", "A"), "succ": succ,
                       "trials": trials, "prop": succ / trials}), "sim_binom_prop")


def sim_gauss_wmean(seed=20250107):
    # 40 groups x U{10..30} rows; each row is the mean of k ~ U{1..10} measurements y = 5 + 1.2 x + b + e,
    # b ~ N(0, 1), e ~ N(0, 2^2): ybar ~ N(5 + 1.2 x + b, 4 / k); weight k (precision weights)
    rng = np.random.default_rng(seed)
    G = 40
    sizes = rng.integers(10, 31, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 1.0, size=G)
    k = rng.integers(1, 11, size=n)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    ybar = np.array([rng.normal(0.0, 2.0, size=kk).mean() for kk in k]) + 5 + 1.2 * x + b[g]
    save(pd.DataFrame({"g": labels(G, "g")[g], "x": x, "k": k, "ybar": np.round(ybar, 6)}), "sim_gauss_wmean")


def sim_pois_w(seed=20250108):
    # 50 groups x U{10..30} rows; x ~ N(0,1); y ~ Poisson(exp(0.5 + 0.3 x + b)), b ~ N(0, 0.5^2);
    # w ~ U(0.5, 3) rounded to 2 decimals: sampling weights, not related to y (glmmTMB: log-likelihood x w)
    rng = np.random.default_rng(seed)
    G = 50
    sizes = rng.integers(10, 31, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size
    b = rng.normal(0.0, 0.5, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    y = rng.poisson(np.exp(0.5 + 0.3 * x + b[g]))
    w = np.round(rng.uniform(0.5, 3.0, size=n), 2)
    save(pd.DataFrame({"g": labels(G, "g")[g], "x": x, "w": w, "y": y}), "sim_pois_w")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for fn in (sim_nb_clinics, sim_nb_slope, sim_gamma_log, sim_gamma_inv, sim_gamma_identity,
               sim_binom_prop, sim_gauss_wmean, sim_pois_w):
        fn()
