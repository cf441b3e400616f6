"""Predictions from a fit: on new rows in Python (``FitResult.predict``), and a site's fitted values at the
site (``fedglmm site predict``) from a fit's JSON and its own data -- fitted values never leave a site.

Everything a prediction needs is what the coordinator has: the formula and the agreed schema (factor
levels, the pooled state of ``center()``, ``scale()``, ``poly()``, ...), the fixed effects, and the
conditional modes per group.  The JSON of a fit (``FitResult.to_dict``) holds all of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import InputError
from .model.families import Family, get_family
from .model.spec import ModelSpec, Schema

TYPES = ("link", "response")
NO_NEWDATA = ("fitted values stay at the sites: a site gets its own with 'fedglmm site predict --fit fit.json "
              "--data SITE.csv --output fitted.csv' (written to its own disk, never sent); predict() needs newdata")


@dataclass
class Predictor:
    """What a prediction needs (see the module docstring)."""

    spec: ModelSpec
    schema: Schema
    family: Family
    fixef: pd.Series
    modes: dict | None              # {grouping factor: conditional modes, one row per level}, in Z's order

    @classmethod
    def from_result(cls, res) -> "Predictor":
        modes = res.ranef(by_factor=True) if res.modes is not None else None
        return cls(res.spec, res.schema, res.family, res.fixef, modes)

    @classmethod
    def from_dict(cls, d: dict, source: str = "the fit") -> "Predictor":
        """From a fit's JSON (``FitResult.to_dict``); a file from before prediction was possible is refused."""
        from .model.formula import parse_formula

        if not isinstance(d, dict) or "schema" not in d or "fixef" not in d or "formula" not in d:
            raise InputError(f"{source} is not the JSON of a fedglmm fit with its schema (write it with "
                             "'fedglmm fit --json' or FitResult.to_json)")
        sch = d["schema"]
        schema = Schema(kinds=dict(sch["kinds"]), levels={k: list(v) for k, v in sch["levels"].items()},
                        transforms=dict(sch.get("transforms", {})))
        fixef = pd.Series({k: float(v) for k, v in d["fixef"].items()})
        modes = None
        if d.get("ranef"):
            modes = {}
            for group, levels in d["ranef"].items():
                rows = {lv: {k: (np.nan if v is None else float(v)) for k, v in r["mode"].items()}
                        for lv, r in levels.items()}
                m = pd.DataFrame.from_dict(rows, orient="index")
                m.index = pd.Index([str(i) for i in m.index], dtype=object)
                modes[group] = m
        return cls(parse_formula(d["formula"]), schema, get_family(d["family"], d.get("link")), fixef, modes)

    def predict(self, newdata, type: str = "link", conditional: bool = True) -> pd.Series:
        """Predictions for the rows of ``newdata``, indexed like it; NaN for a row lacking a value the
        prediction needs (as R's ``na.pass``)."""
        from .model.design import new_data_matrices
        from .model.formula import variables

        if newdata is None:
            raise InputError(NO_NEWDATA)
        if not isinstance(newdata, pd.DataFrame):
            raise InputError(f"newdata must be a DataFrame, not {newdata.__class__.__name__}")
        if type not in TYPES:
            raise InputError(f"type must be 'link' or 'response', not {type!r}")
        cond = bool(conditional) and self.modes is not None
        cols = variables(self.spec, outcome=False, group=False) + (list(self.spec.grouping_columns) if cond else [])
        present = [c for c in dict.fromkeys(cols) if c in newdata.columns]
        ok = ~newdata[present].isna().any(axis=1).to_numpy() if present else np.ones(len(newdata), bool)
        out = np.full(len(newdata), np.nan)
        if ok.any():
            rows = newdata[ok] if not ok.all() else newdata
            X, Z, offset, groups = new_data_matrices(self.spec, self.schema, rows, need_group=cond)
            eta = X @ self.fixef[self._x_names(X)].to_numpy() + offset
            start = 0
            for g, m in (self.modes.items() if cond else ()):     # each factor's columns of Z, in order
                b = m.reindex(pd.Index(groups[g], dtype=object)).fillna(0.0).to_numpy()
                eta = eta + np.sum(Z[:, start:start + b.shape[1]] * b, axis=1)
                start += b.shape[1]
            out[ok] = eta if type == "link" else self.family.mean(eta)
        return pd.Series(out, index=newdata.index, name="fitted" if type == "response" else "link")

    def _x_names(self, X) -> list:
        if X.shape[1] != len(self.fixef):
            raise InputError(f"new data give {X.shape[1]} fixed-effect columns, the fit has {len(self.fixef)}")
        return list(self.fixef.index)


def site_fitted(fit_json: dict, frame: pd.DataFrame, type: str = "response", conditional: bool = True,
                source: str = "the fit") -> pd.DataFrame:
    """A site's fitted values for its own rows: ``line`` (or ``row``) and the value, one row per data row."""
    pred = Predictor.from_dict(fit_json, source).predict(frame, type=type, conditional=conditional)
    label = frame.index.name if frame.index.name in ("line", "row") else "row"
    return pd.DataFrame({label: np.asarray(frame.index), pred.name: pred.to_numpy()})
