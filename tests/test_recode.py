"""A site's own-coding design read off its one-shot design (fedglmm.model.recode) equals the one formulaic
builds in the own coding -- same columns, names and values -- for main effects, interactions, factors
without an intercept, functions of columns and single-level factors; and it is not read off (None, the
design is built) where the module cannot vouch for it: other contrasts, factors in Z."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedglmm.model.design import build_design, describe_frame
from fedglmm.model.families import get_family
from fedglmm.model.formula import parse_formula
from fedglmm.model.recode import own_design
from fedglmm.site.own_fit import _site_schema
from fedglmm.site.summaries import SENTINEL, _local_schema


def _frame(seed=3, n=120, single=False):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "y": rng.integers(0, 2, n).astype(float),
        "a": np.array(["x", "y", "z"])[rng.integers(0, 1 if single else 3, n)],
        "b": np.array(["p", "q"])[rng.integers(0, 2, n)],
        "u": rng.normal(size=n), "v": rng.uniform(0.5, 2.0, n),
        "g": np.array([f"g{k}" for k in range(12)])[rng.integers(0, 12, n)],
    })


DERIVED = ["y ~ a + u + (1 | g)", "y ~ a * u + (1 | g)", "y ~ a * b + (1 | g)", "y ~ 0 + a + u + (1 | g)",
           "y ~ a:u + (1 | g)", "y ~ a:b + (1 | g)", "y ~ u + I(u**2) + b + (1 + u | g)",
           "y ~ log(v) * a + (1 | g)", "y ~ C(a) + u + (1 | g)", "y ~ a + b + u:b + (1 | g)",
           "y ~ 0 + a:b + u + (1 | g)", "y ~ u + v + (1 | g)", "y ~ a * b * u + (1 | g)"]
BUILT = ["y ~ C(a, contr.sum) + u + (1 | g)", "y ~ u + (1 + b | g)"]


def _designs(formula, df):
    spec, fam = parse_formula(formula), get_family("binomial")
    desc = describe_frame(df, spec, "s")
    specs: dict = {}
    oneshot = build_design(spec, _local_schema(desc, spec), df, fam, "s", checked=True, specs=specs)
    built = build_design(spec, _site_schema(df, spec, "s", None, desc), df, fam, "s", checked=True)
    return own_design(oneshot, specs, SENTINEL), built


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("formula", DERIVED)
def test_own_design_is_formulaics_own_coding(formula, single):
    derived, built = _designs(formula, _frame(single=single))
    assert derived is not None
    assert derived.x_names == built.x_names
    for field in ("X", "Z", "y", "trials", "offset", "group", "theta_mask"):
        a, b = getattr(derived, field), getattr(built, field)
        assert a.shape == b.shape and np.array_equal(a, b), field
    assert (derived.z_names, derived.group_levels) == (built.z_names, built.group_levels)


@pytest.mark.parametrize("formula", BUILT)
def test_own_design_is_built_where_it_cannot_be_read_off(formula):
    derived, _ = _designs(formula, _frame())
    assert derived is None
