"""The figures an analyst looks at, drawn from what the coordinator holds (no row of any site):

* ``caterpillar``: each random-effect term's conditional modes with 95 % intervals (mode ± 1.96
  conditional SD), groups sorted by their mode and coloured by the site that holds them;
* ``forest``: the fixed effects with their intervals (profile intervals when computed, else Wald);
* ``residuals``: from the diagnostics round (:mod:`fedglmm.coordinator.diagnostics`), a QQ plot of the
  randomized quantile residuals (the pooled binned distribution against the uniform, on the normal scale,
  with a pointwise 95 % band) and the binned residuals against the fitted values with ±2 SE;
* ``convergence``: the Newton decrement gᵀH⁻¹g of each round of the fit (log scale).

``plot(res, kind)`` returns a matplotlib Figure (built without pyplot, so nothing global changes);
:func:`save_all` writes every figure that applies as PNG.  matplotlib is the optional extra
``fedglmm[plot]``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import special, stats

from .errors import FedGLMMError

KINDS = ("caterpillar", "forest", "residuals", "convergence")


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FedGLMMError("plots need matplotlib: pip install 'fedglmm[plot]'") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot(res, kind: str, **kw):
    """The figure ``kind`` (one of :data:`KINDS`) of a fit."""
    draw = {"caterpillar": caterpillar, "forest": forest, "residuals": residuals,
            "convergence": convergence}.get(kind)
    if draw is None:
        raise ValueError(f"unknown plot '{kind}': use one of {', '.join(KINDS)}")
    return draw(res, **kw)


def caterpillar(res, level: float = 0.95):
    """Conditional modes with intervals, one panel per random-effect term (groups in the order of the first
    term's modes, as lme4's ``dotplot(ranef(m))``), coloured by site."""
    if res.modes is None:
        raise FedGLMMError("this model has no random effects to plot")
    modes, sds = res.ranef(condvar=True)
    keep = modes.notna().all(axis=1)
    modes, sds = modes[keep], sds[keep]
    sites = res.level_sites.reindex(modes.index) if res.level_sites is not None else None
    z = stats.norm.ppf(0.5 + level / 2.0)
    terms = list(modes.columns)
    n = len(modes)
    fig = _figure(3.6 * len(terms) + 1.2, min(max(3.0, 0.16 * n + 1.2), 14.0))
    site_ids = list(dict.fromkeys(sites.tolist())) if sites is not None else ["all"]
    colours = {s: f"C{i % 10}" for i, s in enumerate(site_ids)}
    order = np.argsort(modes[terms[0]].to_numpy(), kind="stable")
    for k, term in enumerate(terms):
        ax = fig.add_subplot(1, len(terms), k + 1)
        m, s = modes[term].to_numpy()[order], sds[term].to_numpy()[order]
        labs = np.asarray(modes.index)[order]
        col = [colours[x] for x in (sites.to_numpy()[order] if sites is not None else ["all"] * n)]
        y = np.arange(n)
        ax.hlines(y, m - z * s, m + z * s, colors=col, linewidth=1.2)
        ax.scatter(m, y, c=col, s=12, zorder=3)
        ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle="--")
        ax.set_yticks(y if n <= 60 else [])
        if n <= 60:
            ax.set_yticklabels([str(v) for v in labs] if k == 0 else [""] * n, fontsize=7)
        ax.set_title(term)
        ax.set_xlabel(f"conditional mode ± {100 * level:g} %")
    fig.suptitle(f"Random effects of {res.group_name} ({n} groups, {res.nsites} site{'s' if res.nsites != 1 else ''})")
    fig.tight_layout()
    if sites is not None and len(site_ids) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colours[s], marker="o", linewidth=1.2, label=str(s)) for s in site_ids]
        fig.legend(handles=handles, title="site", loc="center right", fontsize=8)
        fig.subplots_adjust(right=0.86)
    return fig


def forest(res, level: float = 0.95, intercept: bool = False):
    """Fixed effects with intervals: profile intervals if they were computed at ``level``, else Wald."""
    key = round(float(level), 12)
    prof = res.profiles.get(key)
    ci = res.conf_int(level)
    how = "Wald"
    if prof is not None:
        ci = prof.loc[[n for n in prof.index if n in res.fixef.index]]
        how = "profile"
    names = [n for n in res.fixef.index if intercept or n != "Intercept"]
    if not names:
        names = list(res.fixef.index)
    est = res.fixef[names].to_numpy()
    lo, hi = ci.loc[names].iloc[:, 0].to_numpy(), ci.loc[names].iloc[:, 1].to_numpy()
    fig = _figure(6.0, max(2.2, 0.45 * len(names) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))[::-1]
    ax.hlines(y, lo, hi, color="C0", linewidth=2)
    ax.scatter(est, y, color="C0", zorder=3)
    ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    scale = "" if res.family.link == "identity" else f" ({res.family.link} scale)"
    ax.set_xlabel(f"estimate with {100 * level:g} % {how} interval{scale}")
    ax.set_title("Fixed effects")
    fig.tight_layout()
    return fig


def residuals(res):
    """QQ plot of the quantile residuals and binned residuals against fitted values (diagnostics round)."""
    diag = res.diagnostics
    if diag is None:
        raise FedGLMMError("no diagnostics: fit with diagnostics=True (--diagnostics) or call res.diagnose()")
    fig = _figure(10.0, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    expected, observed = diag.qq_points()
    n = diag.u["count"].sum()
    band = 1.96 * np.sqrt(expected * (1 - expected) / n)
    q = special.ndtri
    edge = 0.5 / n                                    # the band is drawn within the data's own range
    ax.fill_between(q(expected), q(np.clip(expected - band, edge, 1 - edge)),
                    q(np.clip(expected + band, edge, 1 - edge)), color="0.85", label="pointwise 95 % band")
    ax.plot(q(expected), q(np.clip(observed, 1e-9, 1 - 1e-9)), "o", color="C0", markersize=3, label="observed")
    lim = [q(expected[0]), q(expected[-1])]
    ax.plot(lim, lim, color="0.3", linewidth=0.8)
    u = diag.uniformity()
    ax.set_title(f"Quantile residuals: uniformity p = {u['p_value']:.3g}", fontsize=10)
    ax.set_xlabel("expected (normal quantile)")
    ax.set_ylabel("observed (normal quantile)")
    ax.legend(loc="upper left", fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    b = diag.binned_residuals()
    ax.fill_between(b["fitted"], -2 * b["se"], 2 * b["se"], color="0.85", step="mid", label="±2 SE")
    ax.plot(b["fitted"], b["residual"], "o", color="C1", markersize=4, label="mean residual")
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    disp = diag.dispersion()
    extra = f"; dispersion ratio {disp['ratio']:.2f} (p = {disp['p_value']:.3g})" if disp else ""
    ax.set_title(f"Binned residuals vs fitted{extra}", fontsize=10)
    ax.set_xlabel("fitted value (response scale, bin mean)")
    ax.set_ylabel("mean residual y − fitted")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def convergence(res):
    """The Newton decrement of each round of the fit."""
    if not res.trace:
        raise FedGLMMError("this fit has no Newton rounds to plot")
    r = np.array([t["round"] for t in res.trace])
    d = np.array([t["decrement"] for t in res.trace], float)
    d = np.where(np.isfinite(d), np.maximum(d, 1e-18), np.nan)
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(r, d, "o-", color="C2")
    ax.set_xlabel("Newton round")
    ax.set_ylabel("Newton decrement gᵀH⁻¹g")
    ax.set_xticks(r)
    local = res.rounds <= 1
    where = "at the coordinator, on the sites' one-shot sums" if local else \
        f"{len(r)} Newton rounds at the sites, {res.rounds} rounds in all"
    ax.set_title(f"Convergence ({where})", fontsize=10)
    ax.axhline(1e-7, color="0.5", linewidth=0.8, linestyle="--", label="tolerance")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def save_all(res, folder) -> list[Path]:
    """Every figure that applies to the fit, as ``folder/<kind>.png``; returns the paths written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedGLMMError(f"cannot write the plots to '{folder}': {e.strerror or e}") from None
    kinds = ["forest"] + (["caterpillar"] if res.modes is not None else []) + \
        (["residuals"] if res.diagnostics is not None else []) + (["convergence"] if res.trace else [])
    out = []
    for kind in kinds:
        path = folder / f"{kind}.png"
        try:
            plot(res, kind).savefig(path)
        except OSError as e:
            raise FedGLMMError(f"cannot write '{path}': {e.strerror or e}") from None
        out.append(path)
    return out
