"""The figures: each drawn from a fit and checked for what it claims to show.  With
FEDGLMM_WRITE_FIGURES=1 the README's figures are rewritten into docs/figures/."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedglmm
from fedglmm.errors import FedGLMMError

pytest.importorskip("matplotlib")
DATA = Path(__file__).parent / "data"
FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


@pytest.fixture(scope="module")
def contra():
    d = pd.read_csv(DATA / "contraception.csv")
    d["region"] = np.array(["north", "south", "east", "west"])[d.district % 4]
    return fedglmm.fit("use ~ urban + age + I(age**2) + livch + (urban | district)", d, family="binomial",
                       site="region", ci="profile", diagnostics=True, method="iterative")


def test_caterpillar_shows_every_released_group_coloured_by_site(contra):
    fig = contra.plot("caterpillar")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == list(contra.modes.columns)
    for ax, term in zip(axes, contra.modes.columns):
        dots = ax.collections[-1]                          # the modes
        x = np.sort(dots.get_offsets()[:, 0])
        assert np.allclose(x, np.sort(contra.modes[term].to_numpy()))
        colours = {tuple(c) for c in dots.get_facecolors()}
        assert len(colours) == 4                          # one colour per site
    # the same order in every panel: the first term's
    first = axes[0].collections[-1].get_offsets()[:, 0]
    assert np.all(np.diff(first) >= 0)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == sorted(set(contra.level_sites), key=list(
        dict.fromkeys(contra.level_sites)).index)


def test_forest_uses_profile_intervals(contra):
    fig = contra.plot("forest")
    ax = fig.axes[0]
    segs = ax.collections[0].get_segments()
    prof = contra.conf_int(method="profile")
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert "Intercept" not in names and len(segs) == len(names)
    lo = sorted(s[0][0] for s in segs)
    assert np.allclose(lo, sorted(prof.loc[names].iloc[:, 0]))
    assert "profile" in ax.get_xlabel()


def test_residual_figure_and_convergence(contra):
    fig = contra.plot("residuals")
    qq, binned = fig.axes
    expected, observed = contra.diagnostics.qq_points()
    pts = qq.lines[0].get_xydata()
    assert len(pts) == len(expected)
    assert "uniformity p" in qq.get_title() and "dispersion ratio" in binned.get_title()
    b = contra.diagnostics.binned_residuals()
    assert np.allclose(binned.lines[0].get_ydata(), b["residual"])
    fig = contra.plot("convergence")
    y = fig.axes[0].lines[0].get_ydata()
    assert len(y) == len(contra.trace) and y[-1] < 1e-7 < y[0]


def test_cli_plots_and_errors(tmp_path, contra):
    from typer.testing import CliRunner

    from fedglmm import cli

    r = CliRunner().invoke(cli.app, ["fit", "-f", "Reaction ~ Days + (Days | Subject)", "--plots",
                                     str(tmp_path / "figs"), "--diagnostics", str(DATA / "sleepstudy.csv")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["caterpillar.png", "convergence.png",
                                                                      "forest.png", "residuals.png"]
    glm = fedglmm.fit("Reaction ~ Days", pd.read_csv(DATA / "sleepstudy.csv"))
    with pytest.raises(FedGLMMError, match="no random effects"):
        glm.plot("caterpillar")
    with pytest.raises(FedGLMMError, match="no diagnostics"):
        glm.plot("residuals")
    with pytest.raises(ValueError, match="unknown plot"):
        glm.plot("pie")


def test_readme_figures(tmp_path, contra):
    """The README's two figures (caterpillar and residual diagnostics of the demo model over 4 sites)."""
    out = FIGURES if os.environ.get("FEDGLMM_WRITE_FIGURES") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    contra.plot("caterpillar").savefig(out / "caterpillar.png")
    contra.plot("residuals").savefig(out / "residuals.png")
    for name in ("caterpillar.png", "residuals.png"):
        assert (out / name).stat().st_size > 10_000 and (FIGURES / name).exists()
