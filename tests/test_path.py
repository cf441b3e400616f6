"""The λ path of seed 001: fits per λ, validation log-likelihood computed by the sites, AIC/BIC choice."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.model.design import build_design, describe_frame
from fedglmm.coordinator.schema import merge_schema
from fedglmm.model.formula import parse_formula
from fedglmm.likelihood.laplace import GLMMLikelihood
from fedglmm.path import fit_path, train_validation

DATA = Path(__file__).parent / "data"
FORMULA = "use ~ urban + age + livch + (1 | district)"


@pytest.fixture(scope="module")
def path():
    df = pd.read_csv(DATA / "contraception.csv")
    df["region"] = np.where(df.district <= 30, "a", "b")
    return df, fit_path(FORMULA, df, site="region", lambdas=(0, 1, 5, 20), criterion="bic", seed=1)


def test_validation_loglik_equals_a_direct_evaluation(path):
    """The sites' validation log-likelihood at each λ's estimate equals the pooled Laplace value."""
    df, res = path
    _, valid = train_validation(df, "region", 0.3, seed=1)
    pooled = pd.concat(valid.values(), ignore_index=True)
    spec, fam = parse_formula(FORMULA), fedglmm.get_family("binomial")
    best = res.best
    lik = GLMMLikelihood(build_design(spec, best.schema, pooled, fam, "v"), fam)
    for lam, fitted in res.fits.items():
        direct = lik.value_grad(np.r_[fitted.fixef.to_numpy(), fitted.theta], grad=False)[0]
        got = res.table.loc[res.table["lambda"] == lam, "loglik_validation"].item()
        assert got == pytest.approx(direct, abs=1e-8)


def test_criteria_and_choice(path):
    df, res = path
    t = res.table
    n_val = sum(len(v) for v in train_validation(df, "region", 0.3, seed=1)[1].values())
    k = res.best.n_params
    assert k == 7                                     # 6 fixed effects and one SD
    assert np.allclose(t.AIC, -2 * t.loglik_validation + 2 * k)
    assert np.allclose(t.BIC, -2 * t.loglik_validation + k * np.log(n_val))
    assert res.penalty == t.loc[t.BIC.idxmin(), "lambda"]
    assert res.best is res.fits[res.penalty]
    # training log-likelihood falls as λ grows (the unpenalised optimum is λ = 0)
    assert all(a >= b - 1e-9 for a, b in zip(t.loglik_train, t.loglik_train[1:]))


def test_split_is_within_sites_and_seeded():
    df = pd.read_csv(DATA / "contraception.csv")
    a_train, a_val = train_validation(df, None, 0.3, seed=4)
    b_train, b_val = train_validation(df, None, 0.3, seed=4)
    assert a_val["site1"].equals(b_val["site1"])
    assert abs(len(a_val["site1"]) / len(df) - 0.3) < 0.05
