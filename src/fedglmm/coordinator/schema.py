"""Schema agreement at the coordinator: the sites' descriptions merged into one schema (column kinds,
factor levels), with the checks that the sites agree, the levels of grouping factors held by several sites
(shared levels, :mod:`fedglmm.likelihood.shared`); and the agreed design's column names."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError, SchemaError
from ..likelihood.setup import Setup
from ..model.design import build_design
from ..model.families import get_family
from ..model.formula import expression_columns, variables
from ..model.labels import level_columns, sort_levels
from ..model.families import Family
from ..model.spec import ModelSpec, Schema
from ..model.transforms import pool_statistics


def merge_schema(descriptions: dict[str, dict], spec: ModelSpec, family, transforms: dict | None = None) -> Schema:
    """Agree on column kinds and factor levels across sites; raise :class:`SchemaError` if they clash.

    ``Schema.kinds`` covers the used columns (a grouping column stored differently at different sites
    is recorded as categorical: only its labels matter); ``Schema.levels`` the used categorical columns
    (not the grouping column unless the model also uses it as a predictor), each the sorted union over
    sites.  A categorical outcome is allowed only for binomial models, with exactly two levels: the
    first is failure (0), the second success (1), as in R's ``glm``.  ``Schema.transforms``: the pooled state
    of the formula's stateful transforms, from the statistics in the descriptions
    (:func:`~fedglmm.model.transforms.pool_statistics`), or ``transforms`` when already pooled.
    """
    fam = get_family(family)
    if not descriptions:
        raise SchemaError("no site descriptions to merge")
    _check_same_columns(descriptions)
    kinds = {col: _agreed_kind(col, descriptions, spec) for col in variables(spec)}
    levels = {}
    for col in level_columns(spec, kinds):
        union = np.concatenate([np.asarray(d["levels"].get(col, []), dtype=str) for d in descriptions.values()])
        levels[col] = sort_levels(union, natural=kinds[col] == "numeric")
    _check_outcome_kinds(spec, kinds, levels, fam)
    shared, nlevels = shared_levels(descriptions, spec, fam)
    omitted = {site: int(d.get("omitted", 0)) for site, d in descriptions.items()}
    if transforms is None and any("transforms" in d for d in descriptions.values()):
        transforms = pool_statistics({site: d.get("transforms", {}) for site, d in descriptions.items()})
    return Schema(kinds=kinds, levels=levels, omitted=omitted, transforms=dict(transforms or {}), shared=shared,
                  nlevels=nlevels)


def _check_same_columns(descriptions: dict[str, dict]) -> None:
    (ref, d0), *rest = descriptions.items()
    for site, d in rest:
        extra = [c for c in d["columns"] if c not in d0["columns"]]
        if extra:
            raise SchemaError(f"site '{site}' has columns that site '{ref}' lacks: {', '.join(extra)}")
        lacking = [c for c in d0["columns"] if c not in d["columns"]]
        if lacking:
            raise SchemaError(f"site '{site}' lacks columns that site '{ref}' has: {', '.join(lacking)}")


def _agreed_kind(col: str, descriptions: dict[str, dict], spec: ModelSpec) -> str:
    per_site = {site: d["columns"][col] for site, d in descriptions.items()}
    kinds = set(per_site.values())
    if len(kinds) == 1:
        return kinds.pop()
    if col in spec.grouping_columns and col not in variables(spec, group=False):
        return "categorical"
    num = next(s for s, k in per_site.items() if k == "numeric")
    txt = next(s for s, k in per_site.items() if k != "numeric")
    raise SchemaError(f"column '{col}' is numeric at site '{num}' but holds text at site '{txt}'")


def _check_outcome_kinds(spec: ModelSpec, kinds: dict, levels: dict, fam) -> None:
    """The outcome, failures and offsets must be numbers (or a 2-level factor outcome for binomial)."""
    if kinds.get(spec.response) == "categorical":
        if fam.name != "binomial" or spec.failures:
            raise SchemaError(f"outcome '{spec.response}' is not numeric"
                              + ("" if spec.failures else " (only a binomial outcome may be a factor)"))
        if len(levels[spec.response]) != 2:
            shown = ", ".join(levels[spec.response][:5])
            raise SchemaError(f"binomial outcome '{spec.response}' must have two levels (failure, success); "
                              f"it has {len(levels[spec.response])}: {shown}")
    exprs = ([spec.response] if spec.response not in kinds else []) + [spec.failures, *spec.offsets, spec.weights]
    for expr in filter(None, exprs):
        bad = [c for c in expression_columns(expr) if kinds.get(c) == "categorical"]
        if bad:
            raise SchemaError(f"column '{bad[0]}' is used as a number in '{expr}' but is not numeric")


SHARED_FAMILIES = ("gaussian", "binomial", "poisson")      # fitted with levels shared by sites


def shared_levels(descriptions: dict[str, dict], spec: ModelSpec, fam) -> tuple[dict, dict]:
    """{factor: {level: number of sites}} for the levels of grouping factors present at two or more sites
    (natural order), and {factor: number of levels over all sites}.  Gaussian models fit them exactly; other families refuse them, naming the factor,
    the level and two of its sites."""
    sites, out, nlevels = list(descriptions), {}, {}
    for name in spec.groups:
        per_site = [np.asarray(_site_groups(descriptions[s], name, spec), dtype=str) for s in sites]
        where = np.repeat(np.asarray(sites, dtype=object), [len(x) for x in per_site])
        labels = np.concatenate(per_site)
        if len(set(labels)) == 1:        # lme4: "grouping factors must have > 1 sampled level"
            raise SchemaError(f"grouping factor '{name}' has a single level ('{labels[0]}') over all sites: a "
                              "random effect needs at least 2 levels (drop the random term for a model without it)")
        counts = pd.Series(labels).value_counts()
        nlevels[name] = len(counts)
        dup = counts[counts > 1]
        if dup.empty:
            continue
        if fam.name not in SHARED_FAMILIES:
            level = sort_levels(np.asarray(dup.index, dtype=str), natural=True)[0]
            at = " and ".join(f"'{s}'" for s in where[labels == level][:2])
            raise SchemaError(f"group '{name}' level '{level}' is present at sites {at}; levels shared by "
                              f"sites are fitted for gaussian, binomial and poisson models ({fam.name} models "
                              "need each group at one site)")
        order = sort_levels(np.asarray(dup.index, dtype=str), natural=True)
        out[name] = {str(lv): int(dup[lv]) for lv in order}
    return out, nlevels


def _site_groups(description: dict, name: str, spec: ModelSpec) -> list:
    """A site's labels of grouping factor ``name`` (a list for one factor, a dict for several)."""
    groups = description["groups"]
    return groups.get(name, []) if isinstance(groups, dict) else groups


def global_names(spec, schema: Schema, family: Family):
    """The agreed design's column names, Λ pattern and each Z column's grouping factor (empty with one
    factor), from a one-row stand-in frame."""
    row = {}
    for col, kind in schema.kinds.items():
        if col in schema.levels:
            row[col] = [schema.levels[col][0]]
        else:
            row[col] = [1.0]                    # a valid outcome of every family, and a weight
    for col in spec.grouping_columns:
        row.setdefault(col, ["g"])
    d = build_design(spec, schema, pd.DataFrame(row), family, "coordinator")
    zgroups = [f.name for f in d.factors for _ in f.columns]
    return list(d.x_names), list(d.z_names), np.asarray(d.theta_mask, bool), zgroups


def check_outcome(st: Setup, spec: ModelSpec, family: Family) -> None:
    """A constant outcome leaves nothing to fit (lme4 refuses it: "Response is constant"): a binomial outcome
    that is 0 (or 1) in every row, a poisson count that is 0 in every row, from the pooled set-up sums.  (A
    constant gaussian outcome is found at the first evaluation: :func:`fedglmm.likelihood.fit.fit_lmm`.)"""
    sums = st.sums
    if family.name == "binomial" and "st_sy" in sums:
        succ, trials = float(sums["st_sy"]), float(sums["st_sv"])
        if succ == 0 or succ == trials:
            what = "0 (failure)" if succ == 0 else "1 (success)"
            each = "every row" if trials == st.n else "every trial"
            raise InputError(f"binomial outcome '{spec.response}' is {what} in {each} at every site: the "
                             "outcome is constant and there is nothing to fit")
    if family.name == "negative_binomial" and "st_z1" in sums and float(sums["st_z1"]) == 0:
        raise InputError(f"negative binomial outcome '{spec.response}' is 0 in every row at every site: the "
                         "outcome is constant and there is nothing to fit")
    if family.name == "poisson" and "xtwx" in sums and "Intercept" in st.names:
        k = st.names.index("Intercept")
        total = float(sums["xtwx"][k, k]) - 0.5 * st.n        # Σ w = Σ (y + ½) at the start μ = y + ½
        if total < 0.25:
            raise InputError(f"poisson outcome '{spec.response}' is 0 in every row at every site: the outcome "
                             "is constant and there is nothing to fit")
