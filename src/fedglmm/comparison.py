"""Model comparison: lme4's ``anova(m0, m1, ...)`` for federated fits.

The table has lme4's columns -- npar, AIC, BIC, logLik, deviance (= −2 logLik), Chisq, Df, Pr(>Chisq) --
one row per model, ordered by npar (ties keep the given order); each Chisq = 2 max(0, ΔlogLik) tests a
row against the row above it with Df = Δnpar degrees of freedom (Pr NA when Df = 0), as lme4 1.1's
``anova.merMod`` computes them.  As there, REML fits are first refitted by maximum likelihood (here at
their sites, a few Newton rounds each, from the REML estimate) and the table notes it: REML criteria of
models with different fixed effects are not comparable.

Models fitted to different rows, responses or families are refused with one line.  The rows are compared
by their count, and, when the sites can still be reached, by a keyed digest each site computes of the
rows and response values the model uses (:func:`fedglmm.site.diagnostics.fingerprint`; one small round
per model).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .errors import FedGLMMError, InputError

COLUMNS = ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]
REFIT_NOTE = "refitting model(s) with ML (instead of REML)"


class AnovaError(InputError):
    """Models that cannot be compared."""


def _response(res) -> str:
    spec = res.spec
    text = spec.response if spec.failures is None else f"cbind({spec.response}, {spec.failures})"
    return " ".join(str(text).split())


def _fingerprints(res) -> dict | None:
    from .coordinator.diagnostics import inspect_request

    session = getattr(res, "session", None)
    if session is None or not hasattr(session, "link") or session.link.transport is None or session.link.closed:
        return None
    replies = session.broadcast(inspect_request(session, ["fingerprint"]), "fingerprint")
    return {sid: r["fingerprint"] for sid, r in replies.items()}


def check_comparable(fits: dict) -> None:
    """Refuse, with one line, models fitted to different families, responses or rows."""
    names = list(fits)
    first = fits[names[0]]
    for nm in names[1:]:
        res = fits[nm]
        if (res.family.name, res.family.link) != (first.family.name, first.family.link):
            raise AnovaError(f"models were fitted with different families: {names[0]} is {first.family.name} "
                             f"({first.family.link}), {nm} is {res.family.name} ({res.family.link})")
        if _response(res) != _response(first):
            raise AnovaError(f"models were fitted to different responses: '{_response(first)}' ({names[0]}) "
                             f"and '{_response(res)}' ({nm})")
        if res.nobs != first.nobs:
            raise AnovaError(f"models were not all fitted to the same rows: {names[0]} has {first.nobs} "
                             f"observations, {nm} has {res.nobs}")
        if sorted(map(str, res.site_ids)) != sorted(map(str, first.site_ids)):
            raise AnovaError(f"models were fitted at different sites: {names[0]} at {', '.join(first.site_ids)}, "
                             f"{nm} at {', '.join(res.site_ids)}")
    prints = {nm: _fingerprints(res) for nm, res in fits.items()}
    known = {nm: p for nm, p in prints.items() if p is not None}
    if len(known) > 1:
        base_name, base = next(iter(known.items()))
        for nm, fp in known.items():
            for sid in base:
                if fp.get(sid) != base[sid]:
                    raise AnovaError(f"models were not all fitted to the same rows and response values: site "
                                     f"'{sid}' used different rows for {base_name} and {nm}")


def anova(*models, **named) -> pd.DataFrame:
    """lme4's likelihood-ratio table for nested models (see the module docstring).

    ``anova(m0, m1)`` names the rows ``m0``, ``m1``, ... in the order given; ``anova(small=m0, big=m1)``
    names them.  Returns a DataFrame with lme4's columns; ``table.attrs["notes"]`` holds the notes
    (the ML refit), ``table.attrs["formulas"]`` the models' formulas and ``table.attrs["rounds"]`` the
    rounds the refits and checks took.
    """
    fits = {f"m{i}": m for i, m in enumerate(models)}
    fits.update(named)
    if len(fits) < 2:
        raise AnovaError("anova compares at least two models")
    for nm, m in fits.items():
        if not hasattr(m, "loglik") or not hasattr(m, "n_params"):
            raise AnovaError(f"{nm} is not a fedglmm fit")
    check_comparable(fits)
    notes, rounds = [], 0
    if any(m.reml for m in fits.values()):
        notes.append(REFIT_NOTE)
        refits = {}
        for nm, m in fits.items():
            if m.reml:
                try:
                    refits[nm] = m.refit_ml()
                except FedGLMMError as exc:
                    raise AnovaError(f"{nm} is a REML fit and cannot be refitted by ML: {exc}") from None
                rounds += refits[nm].rounds
            else:
                refits[nm] = m
        fits = refits
    rounds += sum(m.after_fit.get("fingerprint", {}).get("rounds", 0) for m in fits.values())
    return _table(fits, notes, rounds)


def _table(fits: dict, notes: list, rounds: int) -> pd.DataFrame:
    names = list(fits)
    npar = np.array([fits[n].n_params for n in names])
    order = np.argsort(npar, kind="stable")
    names = [names[i] for i in order]
    ll = np.array([fits[n].loglik for n in names])
    k = npar[order].astype(float)
    nobs = fits[names[0]].nobs
    chisq = np.r_[np.nan, 2.0 * np.maximum(0.0, np.diff(ll))]
    df = np.r_[np.nan, np.diff(k)]
    with np.errstate(invalid="ignore"):
        p = np.where(df > 0, stats.chi2.sf(chisq, np.where(df > 0, df, 1.0)), np.nan)
    tab = pd.DataFrame({"npar": npar[order], "AIC": -2 * ll + 2 * k, "BIC": -2 * ll + np.log(nobs) * k,
                        "logLik": ll, "deviance": -2 * ll, "Chisq": chisq, "Df": df, "Pr(>Chisq)": p},
                       index=pd.Index(names))
    tab["Df"] = tab["Df"].astype("Int64")
    tab.attrs.update(notes=notes, formulas={n: fits[n].formula for n in names}, rounds=rounds)
    return tab


def format_anova(tab: pd.DataFrame) -> str:
    """The table as lme4 prints it: the models, then the columns with significance stars."""
    from .summary import SIGNIF, column, pvalue, stars, table

    lines = ["Models:"] + [f"{n}: {f}" for n, f in tab.attrs.get("formulas", {}).items()]
    cols = [[str(int(v)) for v in tab["npar"]], column(tab["AIC"], decimals=1), column(tab["BIC"], decimals=1),
            column(tab["logLik"], decimals=2), column(tab["deviance"], decimals=1),
            ["" if not np.isfinite(v) else s for v, s in zip(tab["Chisq"], column(tab["Chisq"], decimals=4))],
            ["" if pd.isna(v) else str(int(v)) for v in tab["Df"]],
            ["" if not np.isfinite(v) else pvalue(v) for v in tab["Pr(>Chisq)"]]]
    p = tab["Pr(>Chisq)"].to_numpy(float)
    rows = [[""] + COLUMNS + [""]] + [[str(n)] + [c[i] for c in cols] + [stars(p[i])]
                                      for i, n in enumerate(tab.index)]
    lines += table(rows, [False] + [True] * len(COLUMNS) + [False])
    if any(stars(v) for v in p):
        lines += ["---", SIGNIF]
    lines += [f"Note: {n}" for n in tab.attrs.get("notes", [])]
    return "\n".join(lines)
