#!/usr/bin/env python3
"""Simulate the sim_* data sets of the held-out multi-level reference cases (numpy, fixed seeds).

usage (from the repo root): python3 benchmarks/r/make_heldout_multilevel.py [outdir]
outdir defaults to tests/data/heldout/multilevel. Truths and designs are listed in tests/data/SOURCES.md
and repeated in each function's docstring. Public data sets are written by export_public_multilevel.R.

Conventions: group labels are zero-padded strings with a letter prefix ("h01", "p0001") so that R's
alphabetical factor order is the numeric order and neither R nor pandas reads them as numbers;
`site` columns are the sites of a federated split. Every function has its own seed, so one data set can
be changed without touching the others.
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/heldout/multilevel")
FMT = "%.6f"


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def labels(n, prefix):
    w = len(str(n))
    return np.array([f"{prefix}{i + 1:0{w}d}" for i in range(n)])


def corr_normal(rng, n, sd, corr):
    """n draws of a 2-vector with standard deviations sd and correlation corr."""
    s1, s2 = sd
    cov = np.array([[s1 * s1, corr * s1 * s2], [corr * s1 * s2, s2 * s2]])
    return rng.multivariate_normal(np.zeros(2), cov, size=n)


def save(df, name):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.csv"
    df.to_csv(path, index=False, float_format=FMT)
    print(f"{str(path):60s} {len(df):6d} rows {path.stat().st_size:8d} bytes")
    return df


# ----------------------------------------------------------------------------------------------------
# Nested designs (every level of every factor inside one level of the split column)
# ----------------------------------------------------------------------------------------------------

def sim_mc_binary(seed=20240701):
    """Multi-centre longitudinal binary outcome.

    24 hospitals with 5..40 patients each, 3..10 visits per patient at time = 0, 0.5, 1, ... (years).
    trt ~ Bernoulli(0.5) per patient, age = (years - 60) / 10 with years ~ N(60, 10^2).
    eta = -0.5 - 0.3 time + 0.1 trt + 0.3 age - 0.4 time:trt + h + b0 + b1 time
    h ~ N(0, 0.4^2) per hospital; (b0, b1) per patient with SDs (1.2, 0.3), correlation -0.3.
    """
    rng = np.random.default_rng(seed)
    H = 24
    hosp = labels(H, "h")
    npat = rng.integers(5, 41, size=H)
    h_eff = rng.normal(0, 0.4, size=H)
    P = npat.sum()
    p_h = np.repeat(np.arange(H), npat)
    trt = rng.binomial(1, 0.5, size=P)
    age = (rng.normal(60, 10, size=P) - 60) / 10
    b = corr_normal(rng, P, (1.2, 0.3), -0.3)
    nvis = rng.integers(3, 11, size=P)
    row_p = np.repeat(np.arange(P), nvis)
    time = np.concatenate([0.5 * np.arange(k) for k in nvis])
    tr = trt[row_p]
    eta = (-0.5 - 0.3 * time + 0.1 * tr + 0.3 * age[row_p] - 0.4 * time * tr
           + h_eff[p_h[row_p]] + b[row_p, 0] + b[row_p, 1] * time)
    y = rng.binomial(1, expit(eta))
    return save(pd.DataFrame({"hospital": hosp[p_h[row_p]], "patient": labels(P, "p")[row_p],
                              "time": time, "trt": tr, "age": np.round(age[row_p], 4), "y": y}),
                "sim_mc_binary")


def sim_pois_olre(seed=20240702):
    """Poisson counts with patient and observation-level random effects (overdispersion).

    120 patients with 4..12 rows each; x ~ N(0, 1) per row.
    log mu = 0.8 + 0.5 x + b_patient + e_obs, b ~ N(0, 0.6^2), e ~ N(0, 0.4^2).
    """
    rng = np.random.default_rng(seed)
    P = 120
    n = rng.integers(4, 13, size=P)
    p = np.repeat(np.arange(P), n)
    N = p.size
    x = rng.normal(size=N)
    b = rng.normal(0, 0.6, size=P)
    e = rng.normal(0, 0.4, size=N)
    y = rng.poisson(np.exp(0.8 + 0.5 * x + b[p] + e))
    return save(pd.DataFrame({"patient": labels(P, "p")[p], "obs": labels(N, "o"),
                              "x": x, "y": y}), "sim_pois_olre")


def sim_pois_ward(seed=20240703):
    """Poisson counts, patients in wards, patient labels REUSED across wards (p01.. in every ward).

    20 wards with 8..20 patients each, 3..8 rows per patient; x ~ N(0, 1) per row.
    log mu = 0.5 + 0.4 x + w + b + e; w ~ N(0, 0.5^2) per ward, b ~ N(0, 0.7^2) per ward:patient,
    e ~ N(0, 0.3^2) per row (column obs).
    """
    rng = np.random.default_rng(seed)
    W = 20
    npat = rng.integers(8, 21, size=W)
    w_eff = rng.normal(0, 0.5, size=W)
    pw = np.repeat(np.arange(W), npat)
    plab = np.concatenate([labels(20, "p")[:k] for k in npat])
    P = pw.size
    b = rng.normal(0, 0.7, size=P)
    n = rng.integers(3, 9, size=P)
    rp = np.repeat(np.arange(P), n)
    N = rp.size
    x = rng.normal(size=N)
    e = rng.normal(0, 0.3, size=N)
    y = rng.poisson(np.exp(0.5 + 0.4 * x + w_eff[pw[rp]] + b[rp] + e))
    return save(pd.DataFrame({"ward": labels(W, "w")[pw[rp]], "patient": plab[rp], "obs": labels(N, "o"),
                              "x": x, "y": y}), "sim_pois_ward")


def sim_gauss3(seed=20240704):
    """Gaussian 3-level: visits in patients in hospitals, random slope at the patient level.

    15 hospitals with 10..30 patients, 4..8 visits at time = 0, 1, 2, ... (months); trt ~ Bernoulli(0.5)
    per patient.  y = 20 + 1.5 time - 2 trt + h0 + h1 time + b0 + b1 time + e with
    h0 ~ N(0, 2^2), h1 ~ N(0, 0.3^2) independent per hospital; (b0, b1) per patient with SDs (3, 0.8),
    correlation 0.2; e ~ N(0, 1.5^2).
    """
    rng = np.random.default_rng(seed)
    H = 15
    npat = rng.integers(10, 31, size=H)
    h0 = rng.normal(0, 2.0, size=H)
    h1 = rng.normal(0, 0.3, size=H)
    ph = np.repeat(np.arange(H), npat)
    P = ph.size
    trt = rng.binomial(1, 0.5, size=P)
    b = corr_normal(rng, P, (3.0, 0.8), 0.2)
    nv = rng.integers(4, 9, size=P)
    rp = np.repeat(np.arange(P), nv)
    time = np.concatenate([np.arange(k, dtype=float) for k in nv])
    hh = ph[rp]
    y = (20 + 1.5 * time - 2 * trt[rp] + h0[hh] + h1[hh] * time + b[rp, 0] + b[rp, 1] * time
         + rng.normal(0, 1.5, size=rp.size))
    return save(pd.DataFrame({"hospital": labels(H, "h")[hh], "patient": labels(P, "p")[rp],
                              "time": time, "trt": trt[rp], "y": y}), "sim_gauss3")


def sim_rare(seed=20240705):
    """Rare-event binary outcome (~5 %), clusters nested in centres (grouseticks-like nesting).

    30 centres with 3..8 clusters, 10..40 individuals per cluster; x ~ N(0, 1) per individual,
    z ~ N(0, 1) per cluster.  eta = -3.6 + 0.5 x + 0.4 z + c + k, c ~ N(0, 0.5^2) per centre,
    k ~ N(0, 0.6^2) per cluster.  Cluster labels are unique (k001..).
    """
    rng = np.random.default_rng(seed)
    C = 30
    ncl = rng.integers(3, 9, size=C)
    c_eff = rng.normal(0, 0.5, size=C)
    kc = np.repeat(np.arange(C), ncl)
    K = kc.size
    k_eff = rng.normal(0, 0.6, size=K)
    z = rng.normal(size=K)
    n = rng.integers(10, 41, size=K)
    rk = np.repeat(np.arange(K), n)
    N = rk.size
    x = rng.normal(size=N)
    y = rng.binomial(1, expit(-3.6 + 0.5 * x + 0.4 * z[rk] + c_eff[kc[rk]] + k_eff[rk]))
    return save(pd.DataFrame({"centre": labels(C, "c")[kc[rk]], "cluster": labels(K, "k")[rk],
                              "x": x, "z": z[rk], "y": y}), "sim_rare")


def sim_gauss_singular(seed=20240906):
    """Gaussian nested with a zero hospital variance (a boundary / singular fit).

    The seed was picked on purpose: it is the first of 20240706 + 100 k (k = 0, 1, ...) for which lmer puts
    the hospital SD at exactly 0 under both ML and REML (k = 0 and 1 give 0.21 and 0.16).

    12 hospitals with 8..15 patients, 3..6 rows per patient; x ~ N(0, 1) per row.
    y = 5 + 0.5 x + 0 * hospital + b + e, b ~ N(0, 1) per patient, e ~ N(0, 1).
    """
    rng = np.random.default_rng(seed)
    H = 12
    npat = rng.integers(8, 16, size=H)
    ph = np.repeat(np.arange(H), npat)
    P = ph.size
    b = rng.normal(0, 1.0, size=P)
    n = rng.integers(3, 7, size=P)
    rp = np.repeat(np.arange(P), n)
    x = rng.normal(size=rp.size)
    y = 5 + 0.5 * x + b[rp] + rng.normal(size=rp.size)
    return save(pd.DataFrame({"hospital": labels(H, "h")[ph[rp]], "patient": labels(P, "p")[rp],
                              "x": x, "y": y}), "sim_gauss_singular")


def sim_binom_agg(seed=20240707):
    """Aggregated binomial (successes out of n), clinics in regions, clinic labels reused per region.

    25 regions with 4..10 clinics (c01.. in every region), 2..4 periods per clinic; per row n ~ U{20..80}
    trials and x ~ N(0, 1).  logit p = -1 + 0.3 x + r + c, r ~ N(0, 0.5^2) per region,
    c ~ N(0, 0.4^2) per region:clinic.
    """
    rng = np.random.default_rng(seed)
    R = 25
    ncl = rng.integers(4, 11, size=R)
    r_eff = rng.normal(0, 0.5, size=R)
    cr = np.repeat(np.arange(R), ncl)
    clab = np.concatenate([labels(10, "c")[:k] for k in ncl])
    Cn = cr.size
    c_eff = rng.normal(0, 0.4, size=Cn)
    nper = rng.integers(2, 5, size=Cn)
    rc = np.repeat(np.arange(Cn), nper)
    N = rc.size
    period = np.concatenate([np.arange(1, k + 1) for k in nper])
    trials = rng.integers(20, 81, size=N)
    x = rng.normal(size=N)
    y = rng.binomial(trials, expit(-1 + 0.3 * x + r_eff[cr[rc]] + c_eff[rc]))
    return save(pd.DataFrame({"region": labels(R, "r")[cr[rc]], "clinic": clab[rc], "period": period,
                              "x": x, "n": trials, "y": y}), "sim_binom_agg")


def sim_nb_nested(seed=20240708):
    """Negative binomial counts, patients in centres, 4 visits per patient.

    20 centres with 10..25 patients; trt ~ Bernoulli(0.5) per patient; time = 0..3.
    log mu = 1.0 - 0.4 trt + 0.1 time + c + b; c ~ N(0, 0.3^2) per centre, b ~ N(0, 0.5^2) per patient;
    y ~ NB2(mu, theta = 2) (Var = mu + mu^2 / 2).
    """
    rng = np.random.default_rng(seed)
    C = 20
    npat = rng.integers(10, 26, size=C)
    c_eff = rng.normal(0, 0.3, size=C)
    pc = np.repeat(np.arange(C), npat)
    P = pc.size
    trt = rng.binomial(1, 0.5, size=P)
    b = rng.normal(0, 0.5, size=P)
    rp = np.repeat(np.arange(P), 4)
    time = np.tile(np.arange(4.0), P)
    mu = np.exp(1.0 - 0.4 * trt[rp] + 0.1 * time + c_eff[pc[rp]] + b[rp])
    theta = 2.0
    y = rng.poisson(rng.gamma(theta, mu / theta))
    return save(pd.DataFrame({"centre": labels(C, "c")[pc[rp]], "patient": labels(P, "p")[rp],
                              "trt": trt[rp], "time": time, "y": y}), "sim_nb_nested")


# ----------------------------------------------------------------------------------------------------
# Crossed designs inside one site (no split keeps every level of both factors at one site)
# ----------------------------------------------------------------------------------------------------

def sim_crossed_binom(seed=20240709):
    """40 raters x 30 items, every pair once (1200 rows); x ~ N(0, 1) per pair.

    eta = 0.2 + 0.6 x + r + i, r ~ N(0, 0.8^2) per rater, i ~ N(0, 1.0^2) per item.
    """
    rng = np.random.default_rng(seed)
    R, I = 40, 30
    r = np.repeat(np.arange(R), I)
    i = np.tile(np.arange(I), R)
    x = rng.normal(size=r.size)
    re_r = rng.normal(0, 0.8, size=R)
    re_i = rng.normal(0, 1.0, size=I)
    y = rng.binomial(1, expit(0.2 + 0.6 * x + re_r[r] + re_i[i]))
    return save(pd.DataFrame({"rater": labels(R, "r")[r], "item": labels(I, "i")[i], "x": x, "y": y}),
                "sim_crossed_binom")


def sim_crossed_pois_slope(seed=20240710):
    """50 subjects x 20 items, each pair present with probability 0.8; x ~ N(0, 1) per row.

    log mu = 0.5 + 0.3 x + s0 + s1 x + i; (s0, s1) per subject with SDs (0.5, 0.3), correlation 0.2;
    i ~ N(0, 0.4^2) per item.
    """
    rng = np.random.default_rng(seed)
    S, I = 50, 20
    s = np.repeat(np.arange(S), I)
    i = np.tile(np.arange(I), S)
    keep = rng.random(s.size) < 0.8
    s, i = s[keep], i[keep]
    x = rng.normal(size=s.size)
    bs = corr_normal(rng, S, (0.5, 0.3), 0.2)
    bi = rng.normal(0, 0.4, size=I)
    y = rng.poisson(np.exp(0.5 + 0.3 * x + bs[s, 0] + bs[s, 1] * x + bi[i]))
    return save(pd.DataFrame({"subject": labels(S, "s")[s], "item": labels(I, "i")[i], "x": x, "y": y}),
                "sim_crossed_pois_slope")


# ----------------------------------------------------------------------------------------------------
# Shared factors (levels of one grouping factor at several sites)
# ----------------------------------------------------------------------------------------------------

def sim_teachers(seed=20240712):
    """Students crossed with teachers; sites = 8 districts by student; teachers shared across sites.

    1600 students (200 per site), 400 teachers. Each teacher works at 1 site (55 %), 2 sites (30 %),
    3 sites (10 %) or 4 sites (5 %): a home site drawn uniformly plus distinct others. Each student has
    2..4 distinct teachers drawn uniformly from the teachers working at the student's site; one row per
    (student, teacher) pair. x ~ N(0, 1) per student (prior attainment).
    score = 50 + 3 x + s + t + e, s ~ N(0, 5^2) per student, t ~ N(0, 3^2) per teacher, e ~ N(0, 4^2).
    """
    rng = np.random.default_rng(seed)
    S, T, K = 1600, 400, 8
    nsite = rng.choice([1, 2, 3, 4], size=T, p=[0.55, 0.30, 0.10, 0.05])
    sites_of = [rng.choice(K, size=k, replace=False) for k in nsite]
    at_site = [np.array([t for t in range(T) if k in sites_of[t]]) for k in range(K)]
    st_site = np.repeat(np.arange(K), S // K)
    x = rng.normal(size=S)
    s_eff = rng.normal(0, 5.0, size=S)
    t_eff = rng.normal(0, 3.0, size=T)
    rows_s, rows_t = [], []
    for s in range(S):
        k = rng.integers(2, 5)
        ts = rng.choice(at_site[st_site[s]], size=k, replace=False)
        rows_s += [s] * k
        rows_t += list(ts)
    rs, rt = np.array(rows_s), np.array(rows_t)
    score = 50 + 3 * x[rs] + s_eff[rs] + t_eff[rt] + rng.normal(0, 4.0, size=rs.size)
    return save(pd.DataFrame({"site": labels(K, "d")[st_site[rs]], "student": labels(S, "s")[rs],
                              "teacher": labels(T, "t")[rt], "x": x[rs], "score": score}), "sim_teachers")


def sim_doctors(seed=20240713):
    """Multi-centre binary outcome with doctors; sites = 10 hospitals; ~15 % of doctors at two hospitals.

    10 hospitals with 6..12 doctors whose main hospital it is; each doctor also works at a second
    (uniformly chosen other) hospital with probability 0.15. 60..200 patients per hospital (one row each),
    each treated by a doctor drawn uniformly from the doctors working at that hospital.
    age = (years - 65) / 10 with years ~ N(65, 12^2); sev ~ U{0, 1, 2}.
    eta = -1 + 0.3 age + 0.8 sev + d + h, d ~ N(0, 0.5^2) per doctor, h ~ N(0, 0.4^2) per hospital.
    """
    rng = np.random.default_rng(seed)
    H = 10
    ndoc = rng.integers(6, 13, size=H)
    D = ndoc.sum()
    main = np.repeat(np.arange(H), ndoc)
    second = np.where(rng.random(D) < 0.15, (main + rng.integers(1, H, size=D)) % H, -1)
    d_eff = rng.normal(0, 0.5, size=D)
    h_eff = rng.normal(0, 0.4, size=H)
    npat = rng.integers(60, 201, size=H)
    ph = np.repeat(np.arange(H), npat)
    docs_at = [np.flatnonzero((main == h) | (second == h)) for h in range(H)]
    pd_ = np.array([rng.choice(docs_at[h]) for h in ph])
    N = ph.size
    age = (rng.normal(65, 12, size=N) - 65) / 10
    sev = rng.integers(0, 3, size=N)
    y = rng.binomial(1, expit(-1 + 0.3 * age + 0.8 * sev + d_eff[pd_] + h_eff[ph]))
    hl = labels(H, "h")
    return save(pd.DataFrame({"site": hl[ph], "hospital": hl[ph], "doctor": labels(D, "d")[pd_],
                              "age": np.round(age, 4), "sev": sev, "y": y}), "sim_doctors")


def sim_items_pois(seed=20240714):
    """The same test items scored at 6 centres: counts (errors per item), patients in centres, items shared.

    6 centres with 20..50 patients; 12 items i01..i12; every patient answers every item of the centre's
    battery: centres 1-4 use all 12, centre 5 leaves out i12, centre 6 uses i01..i09 only.
    trt ~ Bernoulli(0.5) and age = (years - 50) / 10 with years ~ N(50, 10^2) per patient.
    log mu = 0.5 + 0.3 trt + 0.2 age + b + a0 + a1 trt; b ~ N(0, 0.5^2) per patient,
    (a0, a1) per item independent N(0, 0.7^2), N(0, 0.25^2).
    """
    rng = np.random.default_rng(seed)
    C, I = 6, 12
    npat = rng.integers(20, 51, size=C)
    pc = np.repeat(np.arange(C), npat)
    P = pc.size
    trt = rng.binomial(1, 0.5, size=P)
    age = (rng.normal(50, 10, size=P) - 50) / 10
    b = rng.normal(0, 0.5, size=P)
    a0 = rng.normal(0, 0.7, size=I)
    a1 = rng.normal(0, 0.25, size=I)
    battery = [I] * 4 + [I - 1, 9]
    rp = np.concatenate([np.full(battery[pc[p]], p) for p in range(P)])
    ri = np.concatenate([np.arange(battery[pc[p]]) for p in range(P)])
    y = rng.poisson(np.exp(0.5 + 0.3 * trt[rp] + 0.2 * age[rp] + b[rp] + a0[ri] + a1[ri] * trt[rp]))
    return save(pd.DataFrame({"site": labels(C, "c")[pc[rp]], "patient": labels(P, "p")[rp],
                              "item": labels(I, "i")[ri], "trt": trt[rp], "age": np.round(age[rp], 4),
                              "y": y}), "sim_items_pois")


if __name__ == "__main__":
    for f in (sim_mc_binary, sim_pois_olre, sim_pois_ward, sim_gauss3, sim_rare, sim_gauss_singular,
              sim_binom_agg, sim_nb_nested, sim_crossed_binom, sim_crossed_pois_slope, sim_teachers,
              sim_doctors, sim_items_pois):
        f()
