"""The printed summary of a fit, laid out like lme4's ``summary()`` (and lmerTest's for gaussian models).

Blocks, in lme4's order: the title and formula; the fit criteria (``REML criterion at convergence`` for
REML fits, else AIC, BIC, logLik, deviance and df.resid); the scaled residuals' quantiles when the
diagnostics round was run (from the sites' binned aggregates, see :mod:`fedglmm.diagnostics`); the random
effects with Variance, Std.Dev. and correlations; the fixed effects (Estimate, Std. Error, df, t value,
Pr(>|t|) as lmerTest for gaussian models, z-tests otherwise) with significance stars; on request the
correlation of the fixed effects; then what the federation cost and the notes.  Numbers are formatted per
column with a common number of decimals, as R's ``format`` does.
"""
from __future__ import annotations

import math
import re

import numpy as np

STARS = ((0.001, "***"), (0.01, "**"), (0.05, "*"), (0.1, "."))
SIGNIF = "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"


def column(values, digits: int = 4, decimals: int | None = None) -> list[str]:
    """Numbers with one number of decimals: enough for every value to show ``digits`` significant digits
    (trailing zeros of a value do not count, as R's ``format``), or exactly ``decimals``; NA for missing."""
    vals = [float(v) if v is not None else math.nan for v in values]
    if decimals is None:
        decimals = 0
        for v in vals:
            if math.isfinite(v) and v != 0:
                text = f"{v:.{digits - 1}e}"                   # v to `digits` significant digits
                mant, exp = text.split("e")
                sig = len(mant.replace("-", "").replace(".", "").rstrip("0")) or 1
                decimals = max(decimals, sig - 1 - int(exp))
        decimals = min(decimals, 12)
    return ["NA" if not math.isfinite(v) else f"{v:.{decimals}f}" for v in vals]


def pvalue(p: float) -> str:
    if not math.isfinite(p):
        return "NA"
    return "<2e-16" if p < 2e-16 else f"{p:.3g}"


def stars(p: float) -> str:
    return next((s for cut, s in STARS if math.isfinite(p) and p < cut), "")


def table(rows: list[list[str]], right: list[bool], indent: str = "") -> list[str]:
    """Rows of cells as aligned lines (right- or left-aligned per column; trailing blanks trimmed)."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return [indent + " ".join(c.rjust(w) if rt else c.ljust(w) for c, w, rt in zip(r, widths, right)).rstrip()
            for r in rows]


def abbreviate(name: str, width: int = 6) -> str:
    """A short column label for the correlation table, as R's ``abbreviate`` (which lme4 uses): the coding
    marks of a factor level dropped (``urban[T.Y]`` -> ``urbanY``), then lower-case vowels and then
    lower-case letters removed from the end until ``width`` characters remain."""
    if name in ("Intercept", "(Intercept)"):
        return "(Intr)"
    out = list(re.sub(r"\[T\.([^\]]*)\]", r"\1", name).replace(" ** ", "^").replace(" ", ""))
    for drop in ("aeiou", "abcdefghijklmnopqrstuvwxyz"):
        i = len(out) - 1
        while len(out) > width and i > 0:
            if out[i] in drop:
                del out[i]
            i -= 1
    return "".join(out)[:width]


def _title(res) -> list[str]:
    fam = res.family
    if fam.name == "gaussian":
        kind = "Linear mixed model fit by " + ("REML" if res.reml else "maximum likelihood") \
            if res.cov_re is not None else "Linear model fit by maximum likelihood"
    elif res.cov_re is not None:
        approx = "Laplace Approximation" if res.nagq == 1 else \
            f"Adaptive Gauss-Hermite Quadrature, nAGQ = {res.nagq}"
        kind = f"Generalized linear mixed model fit by maximum likelihood ({approx})"
    else:
        kind = "Generalized linear model fit by maximum likelihood"
    lines = [f"{kind} [federated over {res.nsites} site{'s' if res.nsites != 1 else ''}]"]
    if fam.name != "gaussian":
        lines.append(f" Family: {getattr(fam, 'display', '') or fam.name}  ( {fam.link} )")
    lines += [f"Formula: {res.formula}", ""]
    return lines


def _criteria(res) -> list[str]:
    if res.reml:
        return [f"REML criterion at convergence: {res.deviance:.1f}", ""]
    head = ["AIC", "BIC", "logLik", "deviance", "df.resid"]
    cells = [f"{v:.1f}" for v in (res.aic, res.bic, res.loglik, res.deviance)] + [str(res.nobs - res.n_params)]
    return table([head, cells], [True] * 5, " ") + [""]


def _scaled_residuals(res) -> list[str]:
    diag = getattr(res, "diagnostics", None)
    if diag is None:
        return []
    q = diag.scaled_quantiles()
    head = ["Min", "1Q", "Median", "3Q", "Max"]
    return [f"Scaled residuals ({diag.quantile_note}):"] + table([head, column(q, 4)], [True] * 5) + [""]


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _omitted(res) -> list[str]:
    omitted = getattr(res, "omitted", {}) or {}
    if not sum(omitted.values()):
        return []
    per_site = ", ".join(f"{s} {k}" for s, k in omitted.items() if k)
    return [f"  ({sum(omitted.values())} observations deleted due to missingness: {per_site})"]


def _random_effects(res) -> list[str]:
    if res.cov_re is None:
        lines = [f"Residual standard deviation: {res.residual_sd:.4f}"] if res.residual_sd is not None else []
        return lines + [f"Number of obs: {res.nobs}; sites: {res.nsites}"] + _omitted(res) + [""]
    vc = res.varcorr()
    rows = [["Groups", "Name", "Variance", "Std.Dev.", "Corr"]]
    var, sd = vc[vc["var2"].isna()], vc[vc["var2"].notna()]
    vtxt, stxt = column(var["vcov"]), column(var["sdcor"])
    last, names = None, []
    for (_, r), v, s in zip(var.iterrows(), vtxt, stxt):
        grp = "" if r["grp"] == last else str(r["grp"])
        last = r["grp"]
        corr = []
        if r["grp"] != "Residual":
            names = names if grp == "" else []
            for other in names:
                c = sd[(sd["grp"] == r["grp"]) & (sd["var1"] == other) & (sd["var2"] == r["var1"])]
                corr.append(f"{c['sdcor'].iloc[0]:.2f}" if len(c) else "")
            names.append(r["var1"])
        rows.append([grp, "" if _missing(r["var1"]) else str(r["var1"]), v, s, " ".join(corr).rstrip()])
    if not any(r[4] for r in rows[1:]):
        rows = [r[:4] for r in rows]
    lines = ["Random effects:"] + table(rows, [False, False, True, True, False][:len(rows[0])], " ")
    ng = "; ".join(f"{k}, {v}" for k, v in res.ngroups.items())
    return lines + [f"Number of obs: {res.nobs}, groups:  {ng}; sites: {res.nsites}"] + _omitted(res) + [""]


def _dispersion(res) -> list[str]:
    """The dispersion line as glmmTMB prints it: negative binomial ϑ; Gamma σ² (σ the CV, 1/√shape)."""
    disp = getattr(res, "dispersion", None)
    if not disp:
        return []
    fam = res.family
    if fam.name == "gamma":
        text = f"Dispersion estimate for {fam.display} family (sigma^2): {disp['sigma'] ** 2:.3g}"
    else:
        text = f"Dispersion parameter for {fam.display} family (): {disp['theta']:.3g}"
    return [text + f"  (SE of {fam.dispersion_name}: {disp['se']:.3g})", ""]


def _fixed_effects(res) -> list[str]:
    tab = res.tests()
    est, se = tab.iloc[:, 0].to_numpy(), tab.iloc[:, 1].to_numpy()
    ses = np.abs(se[np.isfinite(se) & (se != 0)])
    digits = 4
    dec = max(0, digits - 1 - int(math.floor(math.log10(ses.min())))) if len(ses) else 3
    est_txt, se_txt = column(est, decimals=min(dec, 12)), column(se, decimals=min(dec, 12))
    cols = [est_txt, se_txt]
    if "df" in tab.columns:
        cols.append(column(tab["df"], decimals=3))
    cols.append(column(tab.iloc[:, -2], decimals=3))
    p = tab.iloc[:, -1].to_numpy()
    cols.append([pvalue(v) for v in p])
    rows = [[""] + list(tab.columns) + [""]]
    for i, name in enumerate(tab.index):
        rows.append([str(name)] + [c[i] for c in cols] + [stars(p[i])])
    lines = ["Fixed effects:"] + table(rows, [False] + [True] * len(cols) + [False])
    if any(stars(v) for v in p):
        lines += ["---", SIGNIF]
    return lines


def _correlation(res) -> list[str]:
    names = list(res.fixef.index)
    if len(names) < 2:
        return []
    v = res.vcov.to_numpy()
    sd = np.sqrt(np.diag(v))
    corr = v / np.outer(sd, sd)
    short = [abbreviate(n) for n in names]
    rows = [[""] + short[:-1]]
    for i in range(1, len(names)):
        rows.append([str(names[i])] + [f"{corr[i, j]:.3f}" for j in range(i)] + [""] * (len(names) - 1 - i))
    return ["", "Correlation of Fixed Effects:"] + table(rows, [False] + [True] * (len(names) - 1))


def _profiles(res) -> list[str]:
    lines = []
    for level, tab in sorted(res.profiles.items()):
        rows = [[""] + list(tab.columns)]
        lo, hi = column(tab.iloc[:, 0], 4), column(tab.iloc[:, 1], 4)
        rows += [[str(k), a, b] for k, a, b in zip(tab.index, lo, hi)]
        lines += ["", f"Profile confidence intervals ({100 * level:g} %; {tab.attrs.get('rounds')} rounds):"]
        lines += table(rows, [False, True, True])
    return lines


def _diagnostics(res) -> list[str]:
    diag = res.diagnostics
    if diag is None:
        return []
    u = diag.uniformity()
    lines = ["", "Residual diagnostics (randomized quantile residuals, binned at the sites):",
             f"  uniformity: chi-squared = {u['statistic']:.2f}, df = {u['df']}, p = {pvalue(u['p_value'])}"]
    disp = diag.dispersion()
    if disp is not None:
        lines.append(f"  dispersion: ratio = {disp['ratio']:.3f}, z = {disp['z']:.2f}, p = {pvalue(disp['p_value'])}"
                     f" (Pearson chi-squared at the modes {disp['pearson_chisq']:.1f} on {disp['n']} rows)")
    return lines


def format_summary(res, correlation: bool = False) -> str:
    lines = _title(res) + _criteria(res) + _scaled_residuals(res) + _random_effects(res) + _dispersion(res) \
        + _fixed_effects(res)
    if correlation:
        lines += _correlation(res)
    lines += _profiles(res) + _diagnostics(res)
    lines.append("")
    lines.append(f"Rounds: {res.rounds}; bytes to sites: {res.bytes_to_sites}, from sites: "
                 f"{res.bytes_from_sites}; fit time {res.seconds:.3f} s; "
                 f"{'converged' if res.converged else 'NOT CONVERGED'}")
    for purpose, u in res.after_fit.items():
        lines.append(f"After the fit ({purpose}): {u['rounds']} round{'s' if u['rounds'] != 1 else ''}; bytes to "
                     f"sites: {u['bytes_to_sites']}, from sites: {u['bytes_from_sites']}")
    if res.secure_aggregation:
        lines.append("Secure aggregation: on (every round's sums reached the coordinator only as totals over sites)")
    for m in res.messages:
        lines.append(f"Note: {m}")
    return "\n".join(lines)
