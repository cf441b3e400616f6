"""The site totals' start of a binary model with one random intercept (coordinator.starts.totals_variants):
where no site sends a summary of a group or a fit of its own, the first round also tries the start's SD
times 2 and 3 with the coefficients along the attenuation curve.  Checked on data of
benchmarks/binary_each_rounds.py (kept in tests/data/heldout/binary_each/ with lme4's and glmmTMB's fits,
benchmarks/r/make_heldout.sh binary_each) against the iterative fit and the references."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import fedglmm
from fedglmm.coordinator.starts import totals_variants

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from binary_each_rounds import simulate  # noqa: E402

FORMULA = "y ~ trt * t + (1 | g)"
HELD = Path(__file__).parent / "data" / "heldout" / "binary_each"


def _sites(df, per_site: int) -> dict:
    site = df["g"] // per_site
    return {f"s{k}": part.reset_index(drop=True) for k, part in df.groupby(site)}


def _vector(r) -> np.ndarray:
    return np.r_[r.fixef.to_numpy(), [x["sd"] for x in r.random], r.loglik]


def test_binary_start_from_the_totals_reaches_a_large_sd():
    """100 patients x 4 visits, 10 % events, SD 5, two patients a site: no site can send anything but its
    totals, whose moment SD saturates (1.50 here, the fit's 4.09).  The hybrid took 6 rounds from the start's
    SD halved and doubled; with the points along the attenuation curve 4, and the fit is the iterative one."""
    df = pd.read_csv(HELD / "sim_binary_each.csv")
    pd.testing.assert_frame_equal(df, simulate(1, 100, 4, 5.0, 0.1), check_dtype=False)
    data = _sites(df, 2)
    hyb = fedglmm.fit(FORMULA, data, family="binomial")
    it = fedglmm.fit(FORMULA, data, family="binomial", method="iterative")
    assert hyb.rounds <= 4
    np.testing.assert_allclose(_vector(hyb), _vector(it), rtol=1e-8, atol=1e-8)
    # glmmTMB's fit (lme4's stops 5.9e-4 lower in logLik, its SD 4.087 for 4.090)
    lme4, tmb = (json.loads((HELD / f"sim_binary_each_la{s}.json").read_text()) for s in ("", ".tmb"))
    assert hyb.loglik >= max(lme4["logLik"], tmb["logLik"]) - 1e-6
    np.testing.assert_allclose(hyb.fixef.to_numpy(), list(tmb["fixef"].values()), rtol=1e-3)
    np.testing.assert_allclose(hyb.random[0]["sd"], tmb["varcorr"][0]["sdcor"], rtol=1e-3)


def test_totals_variants_only_for_a_binary_random_intercept():
    """The variants are the start's SD times √½, √2 (coefficients kept) and 2, 3 (coefficients times
    √(1 + 4σ²)/√(1 + σ²) and √(1 + 9σ²)/√(1 + σ²)); other families and random slopes keep the fit's own."""
    df = simulate(0, 60, 4, 1.5, 0.35)
    fit = fedglmm.fit(FORMULA, _sites(df, 30), family="binomial", method="iterative")
    st, fam = fit.session.setup, fit.session.family
    (gamma, theta), variants = totals_variants(st, fam)
    sd = theta[0] / st.zs[0]
    assert len(variants) == 4
    for x, f in zip(variants, (np.sqrt(0.5), np.sqrt(2.0), 2.0, 3.0)):
        r = 1.0 if f < 2 else np.sqrt(1.0 + (f * sd) ** 2) / np.sqrt(1.0 + sd ** 2)
        np.testing.assert_allclose(x, np.r_[gamma * r, theta * f], rtol=1e-12)
    pois = fedglmm.fit("y ~ trt * t + (1 | g)", _sites(df, 30), family="poisson", method="iterative")
    assert totals_variants(pois.session.setup, pois.session.family) == (None, None)
    slope = fedglmm.fit("y ~ trt * t + (t | g)", _sites(df, 30), family="binomial", method="iterative")
    assert totals_variants(slope.session.setup, slope.session.family) == (None, None)
