"""The toolbox references (tests/data/toolbox: lme4 anova, profile intervals, lmerTest, VarCorr/ICC and
posterior means from R) and the fits to compare with them."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

DATA = Path(__file__).parent / "data"
TOOLBOX = DATA / "toolbox"


def table(kind: str) -> list[dict]:
    """The rows of ``tests/data/toolbox/<kind>.tsv`` with their reference JSON (``ref``); none if the folder
    is missing (the parametrised tests then show as skipped)."""
    if not (TOOLBOX / f"{kind}.tsv").exists():
        return []
    tab = pd.read_csv(TOOLBOX / f"{kind}.tsv", sep="\t", dtype=str, keep_default_na=False)
    tab.columns = [c.lstrip("# ") for c in tab.columns]
    out = []
    for _, row in tab.iterrows():
        case = dict(row)
        path = TOOLBOX / f"{kind}_{row['name']}.json"
        if not path.exists():          # a row whose reference is not written (check_toolbox.py reports it)
            continue
        case["ref"] = json.loads(path.read_text())
        out.append(case)
    return out


def case(cases: dict, name: str) -> dict:
    """A named reference case, or a skip if the toolbox references are missing."""
    if name not in cases:
        pytest.skip(f"tests/data/toolbox has no case '{name}'")
    return cases[name]


def frame(case: dict) -> pd.DataFrame:
    return pd.read_csv(DATA / case["data"])


def fit(formula: str, data, **kw):
    """A fit, warnings silenced."""
    import fedglmm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fedglmm.fit(formula, data, **kw)
