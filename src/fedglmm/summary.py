"""The printed summary of a fit, laid out like lme4's ``summary(glmer(...))``."""
from __future__ import annotations

import numpy as np


def _fmt(x, digits=4):
    return "NA" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _pfmt(p):
    return "<2e-16" if p < 2e-16 else f"{p:.3g}"


def format_summary(res) -> str:
    fam = res.family
    lines = []
    if fam.name == "gaussian":
        kind = "Linear mixed model fit by " + ("REML" if res.reml else "maximum likelihood") \
            if res.cov_re is not None else "Linear model fit by maximum likelihood"
    elif res.cov_re is not None:
        approx = "Laplace Approximation" if res.nagq == 1 else f"Adaptive Gauss-Hermite Quadrature, nAGQ = {res.nagq}"
        kind = f"Generalized linear mixed model fit by maximum likelihood ({approx})"
    else:
        kind = "Generalized linear model fit by maximum likelihood"
    lines.append(f"{kind} [federated over {res.nsites} site{'s' if res.nsites != 1 else ''}]")
    lines.append(f" Family: {fam.name}  ( {fam.link} )")
    lines.append(f"Formula: {res.formula}")
    lines.append("")
    crit = "REML criterion" if res.reml else "deviance"
    head = ["AIC", "BIC", "logLik", crit if res.reml else "deviance", "df"]
    vals = [res.aic, res.bic, res.loglik, res.deviance, res.n_params]
    w = [max(len(h), len(f"{v:.1f}")) + 2 for h, v in zip(head, vals)]
    lines.append("".join(h.rjust(k) for h, k in zip(head, w)))
    lines.append("".join((f"{v:.1f}" if i < 4 else str(int(v))).rjust(k) for i, (v, k) in enumerate(zip(vals, w))))
    lines.append("")
    if res.cov_re is not None:
        lines.append("Random effects:")
        rows = [("Groups", "Name", "Std.Dev.", "Corr")]
        names = list(res.cov_re.index)
        cov = res.cov_re.to_numpy()
        sd = np.sqrt(np.maximum(np.diag(cov), 0))
        for i, nm in enumerate(names):
            corr = []
            for j in range(i):
                c = cov[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else np.nan
                corr.append("" if cov[i, j] == 0 else f"{c:.2f}")
            rows.append((res.group_name if i == 0 else "", nm, f"{sd[i]:.4f}", " ".join(corr)))
        if res.residual_sd is not None:
            rows.append(("Residual", "", f"{res.residual_sd:.4f}", ""))
        widths = [max(len(r[k]) for r in rows) for k in range(4)]
        for r in rows:
            lines.append(" " + " ".join(r[k].ljust(widths[k]) for k in range(4)).rstrip())
        ng = ", ".join(f"{k}, {v}" for k, v in res.ngroups.items())
        lines.append(f"Number of obs: {res.nobs}, groups:  {ng}; sites: {res.nsites}")
    else:
        if res.residual_sd is not None:
            lines.append(f"Residual standard deviation: {res.residual_sd:.4f}")
        lines.append(f"Number of obs: {res.nobs}; sites: {res.nsites}")
    omitted = getattr(res, "omitted", {}) or {}
    if sum(omitted.values()):
        per_site = ", ".join(f"{s} {k}" for s, k in omitted.items() if k)
        lines.append(f"  ({sum(omitted.values())} observations deleted due to missingness: {per_site})")
    lines.append("")
    lines.append("Fixed effects:")
    tab = res.coef_table()
    cols = list(tab.columns)
    cells = [["", *cols]]
    for name, row in tab.iterrows():
        cells.append([str(name), _fmt(row.iloc[0], 6), _fmt(row.iloc[1], 6), f"{row.iloc[2]:.3f}",
                      _pfmt(row.iloc[3]), _fmt(row.iloc[4], 6), _fmt(row.iloc[5], 6)])
    widths = [max(len(r[k]) for r in cells) for k in range(len(cells[0]))]
    for r in cells:
        lines.append(r[0].ljust(widths[0]) + "".join(" " + c.rjust(wd) for c, wd in zip(r[1:], widths[1:])))
    lines.append("")
    lines.append(f"Rounds: {res.rounds}; bytes to sites: {res.bytes_to_sites}, from sites: "
                 f"{res.bytes_from_sites}; fit time {res.seconds:.3f} s; "
                 f"{'converged' if res.converged else 'NOT CONVERGED'}")
    for m in res.messages:
        lines.append(f"Note: {m}")
    return "\n".join(lines)
