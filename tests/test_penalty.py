"""The seed's L2 penalty λ‖β‖² on the fixed effects, applied by the coordinator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

import fedglmm
from fedglmm.errors import InputError

DATA = Path(__file__).parent / "data"


def test_penalised_glm_equals_a_direct_optimisation():
    """Logistic GLM with λ‖β‖² (intercept free): the same optimum as scipy's BFGS on the written-out objective."""
    df = pd.read_csv(DATA / "contraception.csv")
    lam = 3.0
    res = fedglmm.fit("use ~ urban + age + livch", df, family="binomial", penalty=lam, method="iterative")
    X = np.column_stack([np.ones(len(df)), df.urban == "Y", df.age, df.livch == "1", df.livch == "2",
                         df.livch == "3+"]).astype(float)
    y = df.use.to_numpy(float)

    def objective(b):
        eta = X @ b
        return -(y @ eta - np.logaddexp(0, eta).sum()) + lam * b[1:] @ b[1:]

    def gradient(b):
        mu = 1 / (1 + np.exp(-X @ b))
        g = -(X.T @ (y - mu))
        g[1:] += 2 * lam * b[1:]
        return g

    direct = optimize.minimize(objective, np.zeros(6), jac=gradient, method="BFGS", options={"gtol": 1e-10})
    assert np.allclose(res.fixef.to_numpy(), direct.x, atol=1e-6)
    assert any("penalty" in m for m in res.messages)


def test_penalty_shrinks_and_zero_is_the_plain_fit():
    df = pd.read_csv(DATA / "contraception.csv")
    f = "use ~ urban + age + livch + (1 | district)"
    plain = fedglmm.fit(f, df, family="binomial")
    zero = fedglmm.fit(f, df, family="binomial", penalty=0.0)
    assert np.allclose(plain.fixef, zero.fixef, atol=1e-10)
    norms = [np.linalg.norm(fedglmm.fit(f, df, family="binomial", penalty=lam).fixef.drop("Intercept"))
             for lam in (0.0, 1.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(norms, norms[1:]))


def test_penalised_glmm_is_a_stationary_point_of_the_penalised_objective():
    """The penalised GLMM optimum: the Laplace log-likelihood's gradient balances the penalty's."""
    from fedglmm.api import make_sites
    from fedglmm.model.design import build_design, describe_frame
    from fedglmm.coordinator.schema import merge_schema
    from fedglmm.model.formula import parse_formula
    from fedglmm.likelihood.laplace import GLMMLikelihood

    df = pd.read_csv(DATA / "contraception.csv")
    f, lam = "use ~ urban + age + (1 | district)", 5.0
    res = fedglmm.fit(f, df, family="binomial", penalty=lam, method="iterative")
    spec = parse_formula(f)
    fam = fedglmm.get_family("binomial")
    schema = merge_schema({"a": describe_frame(df, spec, "a")}, spec, fam)
    lik = GLMMLikelihood(build_design(spec, schema, df, fam, "a"), fam)
    phi = np.r_[res.fixef.to_numpy(), res.theta]
    _, g, _ = lik.value_grad(phi)
    pen = 2 * lam * np.r_[0.0, res.fixef.to_numpy()[1:], 0.0]
    assert np.max(np.abs(g - pen)) < 1e-4 * max(1.0, np.max(np.abs(g)))


def test_penalty_refused_where_it_does_not_apply():
    df = pd.read_csv(DATA / "sleepstudy.csv")
    with pytest.raises(InputError, match="binomial and poisson"):
        fedglmm.fit("Reaction ~ Days + (1 | Subject)", df, penalty=1.0)
    with pytest.raises(InputError, match="non-negative"):
        fedglmm.fit("use ~ urban + (1 | district)", pd.read_csv(DATA / "contraception.csv"), family="binomial",
                    penalty=-1.0)
