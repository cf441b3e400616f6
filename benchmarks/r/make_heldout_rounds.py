#!/usr/bin/env python3
"""Simulate the data sets of the held-out group `rounds` (tests/data/heldout/rounds/).

Kinds of data on which a federated optimiser must converge in few rounds, each with known truth (in each
function's comment and in tests/data/SOURCES.md). The public twins (toenail, epil, Salamanders, guImmun)
come from benchmarks/r/export_heldout_public.R.

usage (from the repo root): python3 benchmarks/r/make_heldout_rounds.py [outdir]
numpy default_rng with the fixed seeds below. Labels are zero-padded strings (R's alphabetical factor order
= numeric order); categorical columns are non-numeric strings.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtr

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/heldout/rounds")


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def labels(n, prefix):
    w = len(str(n))
    return np.array([f"{prefix}{i + 1:0{w}d}" for i in range(n)])


def save(df, name):
    path = OUT / f"{name}.csv"
    df.to_csv(path, index=False)  # floats are rounded where made
    print(path, len(df), "rows", path.stat().st_size, "bytes")


def sim_toenail(seed=20250201):
    # toenail's shape: 294 patients, planned visits at months 0, 1, 2, 3, 6, 9, 12 (+ U(-0.2, 0.2) jitter
    # after the first); each later visit missing with prob 0.07; treatment A/B (half each);
    # logit p = -1.6 - 0.2[B] - 0.4 time - 0.15 time[B] + b, b ~ N(0, 4^2)
    rng = np.random.default_rng(seed)
    G = 294
    planned = np.array([0.0, 1.0, 2.0, 3.0, 6.0, 9.0, 12.0])
    b = rng.normal(0.0, 4.0, size=G)
    trtB = rng.permutation(np.arange(G) < G // 2)
    rows = []
    for i in range(G):
        keep = np.concatenate([[True], rng.random(6) >= 0.07])
        t = planned + np.concatenate([[0.0], rng.uniform(-0.2, 0.2, size=6)])
        for v in np.flatnonzero(keep):
            rows.append((i, v + 1, round(t[v], 4)))
    g = np.array([r[0] for r in rows])
    visit = np.array([r[1] for r in rows])
    time = np.array([r[2] for r in rows])
    eta = -1.6 - 0.2 * trtB[g] - 0.4 * time - 0.15 * time * trtB[g] + b[g]
    y = (rng.random(g.size) < expit(eta)).astype(int)
    save(pd.DataFrame({"patient": labels(G, "p")[g], "y": y, "treatment": np.where(trtB[g], "B", "A"),
                       "time": time, "visit": visit}), "sim_toenail")


def sim_epil(seed=20250202):
    # epil's shape: 59 subjects x 4 periods; trt (29 of 59 treated), subject-level lbase ~ N(0, 0.75^2),
    # lage ~ N(0, 0.2^2); V4 = [period 4]; log mu = 1.8 - 0.3 trt + 0.9 lbase + 0.5 lage - 0.15 V4 + b,
    # b ~ N(0, 0.5^2); y ~ Poisson(mu)
    rng = np.random.default_rng(seed)
    G = 59
    g = np.repeat(np.arange(G), 4)
    period = np.tile(np.arange(1, 5), G)
    trt = rng.permutation(np.arange(G) < 29)
    lbase = np.round(rng.normal(0.0, 0.75, size=G), 6)
    lage = np.round(rng.normal(0.0, 0.2, size=G), 6)
    b = rng.normal(0.0, 0.5, size=G)
    V4 = (period == 4).astype(int)
    mu = np.exp(1.8 - 0.3 * trt[g] + 0.9 * lbase[g] + 0.5 * lage[g] - 0.15 * V4 + b[g])
    y = rng.poisson(mu)
    save(pd.DataFrame({"subject": labels(G, "s")[g], "period": period, "y": y,
                       "trt": np.where(trt[g], "treated", "control"), "lbase": lbase[g], "lage": lage[g],
                       "V4": V4}), "sim_epil")


def sim_salamanders(seed=20250203):
    # Salamanders' shape: 23 sites (10 mined, site-level), 7 species x 4 samples per site (644 rows);
    # log mu = -0.5 + spp effect (S1..S7: 0, -1.0, 0.5, -0.5, 0.7, 0.3, -0.2) - 1.8[mined yes] + b,
    # b ~ N(0, 0.6^2); count ~ Poisson(mu)
    rng = np.random.default_rng(seed)
    G = 23
    mined = rng.permutation(np.arange(G) < 10)
    b = rng.normal(0.0, 0.6, size=G)
    spe = np.array([0.0, -1.0, 0.5, -0.5, 0.7, 0.3, -0.2])
    g = np.repeat(np.arange(G), 28)
    sp = np.tile(np.repeat(np.arange(7), 4), G)
    sample = np.tile(np.arange(1, 5), G * 7)
    mu = np.exp(-0.5 + spe[sp] - 1.8 * mined[g] + b[g])
    count = rng.poisson(mu)
    save(pd.DataFrame({"site": labels(G, "r")[g], "mined": np.where(mined[g], "yes", "no"),
                       "spp": labels(7, "S")[sp], "sample": sample, "count": count}), "sim_salamanders")


def sim_guimmun(seed=20250204):
    # guImmun's shape: 161 communities x U{3..24} children; child-level kid2p (Y .6), mom25p (Y .4),
    # ord (o01/o23/o46/o7p: .35/.35/.2/.1), momEd (N/P/S: .4/.45/.15), husEd (N/P/S/U: .3/.45/.15/.1),
    # momWork (Y .5); community-level ethn (L/N/S: .5/.3/.2), rural (Y .7), pcInd81 ~ U(0, 0.9);
    # logit p = -0.9 + 1.2[kid2p] - 0.2[mom25p] + (0, -0.1, 0.1, 0.3)[ord] + (0, -0.6, -0.2)[ethn]
    #           + (0, 0.4, 0.5)[momEd] + (0, 0.2, 0.5, -0.1)[husEd] + 0.3[momWork] - 0.5[rural] - 0.8 pcInd81 + b,
    # b ~ N(0, 1.0^2)
    rng = np.random.default_rng(seed)
    G = 161
    sizes = rng.integers(3, 25, size=G)
    g = np.repeat(np.arange(G), sizes)
    n = g.size

    def cat(levels, p, size):
        i = rng.choice(len(levels), size=size, p=p)
        return np.array(levels)[i], i

    ethn, ethn_i = cat(["L", "N", "S"], [0.5, 0.3, 0.2], G)
    rural = rng.random(G) < 0.7
    pc = np.round(rng.uniform(0.0, 0.9, size=G), 6)
    kid2p = rng.random(n) < 0.6
    mom25p = rng.random(n) < 0.4
    ord_, ord_i = cat(["o01", "o23", "o46", "o7p"], [0.35, 0.35, 0.2, 0.1], n)
    momEd, momEd_i = cat(["N", "P", "S"], [0.4, 0.45, 0.15], n)
    husEd, husEd_i = cat(["N", "P", "S", "U"], [0.3, 0.45, 0.15, 0.1], n)
    momWork = rng.random(n) < 0.5
    b = rng.normal(0.0, 1.0, size=G)
    eta = (-0.9 + 1.2 * kid2p - 0.2 * mom25p + np.array([0, -0.1, 0.1, 0.3])[ord_i]
           + np.array([0, -0.6, -0.2])[ethn_i][g] + np.array([0, 0.4, 0.5])[momEd_i]
           + np.array([0, 0.2, 0.5, -0.1])[husEd_i] + 0.3 * momWork - 0.5 * rural[g] - 0.8 * pc[g] + b[g])
    y = (rng.random(n) < expit(eta)).astype(int)
    yn = lambda v: np.where(v, "Y", "N")  # noqa: E731
    save(pd.DataFrame({"comm": labels(G, "c")[g], "immun": y, "kid2p": yn(kid2p), "mom25p": yn(mom25p),
                       "ord": ord_, "ethn": ethn[g], "momEd": momEd, "husEd": husEd, "momWork": yn(momWork),
                       "rural": yn(rural[g]), "pcInd81": pc[g]}), "sim_guimmun")


def binary_groups(seed, G, m, b_sd, beta0, beta1, name, fb_coef=None):
    # G groups x m rows; x ~ N(0,1); [f = B] with prob .5 if fb_coef; logit p = beta0 + beta1 x (+ fb_coef [B]) + b
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), m)
    n = g.size
    b = rng.normal(0.0, b_sd, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    eta = beta0 + beta1 * x + b[g]
    cols = {"g": labels(G, "g")[g], "x": x}
    if fb_coef is not None:
        fb = rng.random(n) < 0.5
        eta = eta + fb_coef * fb
        cols["f"] = np.where(fb, "B", "A")
    cols["y"] = (rng.random(n) < expit(eta)).astype(int)
    df = pd.DataFrame(cols)
    return df


def sim_rare(seed=20250205):
    # 200 groups x 30 rows; logit p = -4.2 + 0.5 x + b, b ~ N(0, 0.6^2) (event rate about 2 %)
    save(binary_groups(seed, 200, 30, 0.6, -4.2, 0.5, "sim_rare"), "sim_rare")


def sim_many_sites(seed=20250206):
    # 50 sites x 4 groups x 25 rows (groups g001..g200, site s01 holds g001..g004, ...); x ~ N(0,1), f A/B;
    # logit p = -0.3 + 0.7 x + 0.5[B] + b_group, b ~ N(0, 0.8^2) (no site effect)
    df = binary_groups(seed, 200, 25, 0.8, -0.3, 0.7, "sim_many_sites", fb_coef=0.5)
    gi = df["g"].str[1:].astype(int) - 1
    df.insert(0, "site", labels(50, "s")[gi // 4])
    save(df, "sim_many_sites")


def sim_bigvar(seed=20250207):
    # 100 groups x 20 rows; logit p = 0.5 + 0.8 x + b, b ~ N(0, 3^2)
    save(binary_groups(seed, 100, 20, 3.0, 0.5, 0.8, "sim_bigvar"), "sim_bigvar")


def sim_small_groups(seed=20250208):
    # 1000 groups x 3 rows; logit p = -0.2 + 0.6 x + b, b ~ N(0, 1)
    save(binary_groups(seed, 1000, 3, 1.0, -0.2, 0.6, "sim_small_groups"), "sim_small_groups")


def sim_slope5(seed=20250209):
    # 300 groups x 5 rows; x ~ N(0,1); log mu = 1.0 + 0.4 x + b0 + b1 x, sds (0.5, 0.3), corr -0.3; Poisson
    rng = np.random.default_rng(seed)
    G, m = 300, 5
    g = np.repeat(np.arange(G), m)
    sd = np.array([0.5, 0.3])
    cov = np.outer(sd, sd) * np.array([[1.0, -0.3], [-0.3, 1.0]])
    bb = rng.multivariate_normal(np.zeros(2), cov, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=g.size), 6)
    y = rng.poisson(np.exp(1.0 + 0.4 * x + bb[g, 0] + bb[g, 1] * x))
    save(pd.DataFrame({"g": labels(G, "g")[g], "x": x, "y": y}), "sim_slope5")


def sim_pois_huge(seed=20250210):
    # 50 groups x 20 rows; log mu = 10 + 0.3 x + b, b ~ N(0, 0.5^2) (counts around 2e4)
    rng = np.random.default_rng(seed)
    G, m = 50, 20
    g = np.repeat(np.arange(G), m)
    b = rng.normal(0.0, 0.5, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=g.size), 6)
    y = rng.poisson(np.exp(10.0 + 0.3 * x + b[g]))
    save(pd.DataFrame({"g": labels(G, "g")[g], "x": x, "y": y}), "sim_pois_huge")


def sim_probit(seed=20250211):
    # 100 groups x 30 rows; x ~ N(0,1), f A/B; P(y = 1) = Phi(-0.3 + 0.5 x + 0.4[B] + b), b ~ N(0, 0.7^2)
    rng = np.random.default_rng(seed)
    G, m = 100, 30
    g = np.repeat(np.arange(G), m)
    n = g.size
    b = rng.normal(0.0, 0.7, size=G)
    x = np.round(rng.normal(0.0, 1.0, size=n), 6)
    fb = rng.random(n) < 0.5
    y = (rng.random(n) < ndtr(-0.3 + 0.5 * x + 0.4 * fb + b[g])).astype(int)
    save(pd.DataFrame({"g": labels(G, "g")[g], "x": x, "f": np.where(fb, "B", "A"), "y": y}), "sim_probit")


def sim_three_per_site(seed=20250212):
    # 60 sites x 3 groups (g001..g180, site s01 holds g001..g003, ...) of max(5, Poisson(40)) rows; x, x2 ~ N(0,1)
    # per row, z ~ N(0,1) per group; log mu = 0.5 + 0.5 x - 0.3 x2 + 0.3 z + b, b ~ N(0, 1.5^2); Poisson
    rng = np.random.default_rng(seed)
    G = 180
    g = np.repeat(np.arange(G), np.maximum(5, rng.poisson(40, G)))
    b, z = rng.normal(0.0, 1.5, size=G), np.round(rng.normal(0.0, 1.0, size=G), 6)
    x, x2 = (np.round(rng.normal(0.0, 1.0, size=g.size), 6) for _ in range(2))
    y = rng.poisson(np.exp(0.5 + 0.5 * x - 0.3 * x2 + 0.3 * z[g] + b[g]))
    save(pd.DataFrame({"site": labels(60, "s")[g // 3], "g": labels(G, "g")[g], "x": x, "x2": x2, "z": z[g],
                       "y": y}), "sim_three_per_site")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for fn in (sim_toenail, sim_epil, sim_salamanders, sim_guimmun, sim_rare, sim_many_sites, sim_bigvar,
               sim_small_groups, sim_slope5, sim_pois_huge, sim_probit, sim_three_per_site):
        fn()
