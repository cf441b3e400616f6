"""The site's residual aggregates for the families with a dispersion parameter (negative binomial,
Gamma), at the true parameters of simulated data: the quantile residuals are uniform and the Pearson
residuals' sum of squares has the mean and variance the family's kurtosis gives."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedglmm.coordinator.diagnostics import PEARSON_EDGES, U_BINS, combine
from fedglmm.likelihood.engine import make_engine
from fedglmm.model.design import build_design, describe_frame
from fedglmm.model.dispersion import GammaFamily, NegativeBinomial
from fedglmm.model.formula import parse_formula
from fedglmm.model.spec import Schema
from fedglmm.site import diagnostics


def _residuals(family, y, x, g, beta, sd, psi):
    frame = pd.DataFrame({"y": y, "x": x, "g": g})
    spec = parse_formula("y ~ x + (1 | g)")
    desc = describe_frame(frame, spec, "s")
    d = build_design(spec, Schema(kinds=desc["columns"], levels=desc["levels"]), frame,
                     "poisson" if family.name == "negative_binomial" else "gaussian", "s")
    eng = make_engine(d, family, 1, "observed", np.eye(2), np.ones(1))
    req = {"point": np.r_[beta, sd, psi], "pearson_edges": PEARSON_EDGES, "fitted_edges": np.linspace(-3, 5, 101),
           "seed": 1}
    out = diagnostics.residuals(d, family, eng, req, 0)
    return combine({"s": {"residuals": out}}, family.name, req["fitted_edges"], 1)


@pytest.mark.parametrize("family", [NegativeBinomial("negative_binomial", "log"), GammaFamily("gamma", "log")])
def test_dispersion_families_at_the_truth(family):
    rng = np.random.default_rng(3)
    G, n = 300, 10
    g = np.repeat(np.arange(G), n)
    x = rng.normal(size=g.size)
    beta, sd, psi = np.array([0.5, 0.4]), 0.7, np.log(2.0)
    mu = np.exp(beta[0] + beta[1] * x + sd * rng.normal(size=G)[g])
    shape = np.exp(psi)
    y = rng.poisson(rng.gamma(shape, mu / shape)) if family.name == "negative_binomial" else \
        rng.gamma(shape, mu / shape)
    diag = _residuals(family, y.astype(float), x, g, beta, sd, psi)
    assert diag.uniformity()["p_value"] > 0.01
    z = (diag.draws["sumsq"] - diag.draws["n"]) / np.sqrt(diag.draws["var_sumsq"])
    assert abs(z) < 3.0
    assert diag.u["count"].sum() == G * n and len(diag.u["count"]) == U_BINS
