"""Simulated data sets shared by several test modules."""
from __future__ import annotations

import numpy as np
import pandas as pd


def binomial_many_trials(low: int, high: int, seed: int = 1) -> tuple[pd.DataFrame, dict]:
    """cbind rows of low..high trials (aggregated counts): 60 groups of 20 rows, a covariate x and a random
    intercept of SD 0.6; the data pooled and split over 3 sites by group."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(60), 20)
    x = rng.normal(size=len(g))
    m = rng.integers(low, high, len(g))
    y = rng.binomial(m, 1 / (1 + np.exp(0.3 - 0.4 * x - rng.normal(0, 0.6, 60)[g])))
    df = pd.DataFrame({"y": y, "f": m - y, "x": x, "g": g})
    return df, {f"s{i}": df[g % 3 == i].reset_index(drop=True) for i in range(3)}
