"""The simulation study script: one setting x 2 replicates into a temporary directory."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    study = _load()
    out = tmp_path_factory.mktemp("study")
    res = study.run_study(["s1"], 2, list(study.METHODS), str(out), seed=3, jobs=1, quiet=True)
    return study, out, res


def test_files_exist(run):
    _, out, res = run
    md = out / "study.md"
    assert md.is_file()
    text = md.read_text()
    assert "2 replicates per setting" in text
    assert "Seed's findings, checked" in text
    for name in ("coef_error.png", "power.png", "roc.png", "cost.png"):
        p = out / "figures" / name
        assert p.is_file() and p.stat().st_size > 5000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}" in text


def test_table_numbers_finite(run):
    study, out, res = run
    text = (out / "study.md").read_text()
    section = text.split("### s1", 1)[1].split("Per-coefficient", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert len(rows) == len(study.METHODS)
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")][1:]
        method = ln.split("|")[1].strip()
        for c in cells:
            if method == "oneshot" and c == "–":   # a refused one-shot fit has no accuracy numbers
                continue
            assert re.fullmatch(r"-?\d+(\.\d+)?", c), (method, c)
            assert np.isfinite(float(c))


def test_summary_ranges(run):
    _, _, res = run
    summ = res["summary"]
    fitted = summ[summ.fits > summ.refused]
    assert ((fitted.coverage >= 0) & (fitted.coverage <= 1)).all()
    for col in ("recall", "precision", "converged", "auc"):
        vals = fitted[col].dropna()
        assert ((vals >= 0) & (vals <= 1)).all(), col
    assert np.isfinite(fitted[["mean_rmse", "mean_abs_bias", "rounds", "seconds"]].to_numpy()).all()


def test_pooled_equals_federated(run):
    study, _, res = run
    df = res["records"]
    ok = df[df.status == "ok"]
    cols = [f"est_{c}" for c in study.COEFS]
    a = ok[ok.method == "pooled"].sort_values("rep")[cols].to_numpy()
    b = ok[ok.method == "laplace"].sort_values("rep")[cols].to_numpy()
    assert a.shape == b.shape == (2, len(study.COEFS))
    assert np.max(np.abs(a - b)) < 1e-6
    assert study.max_pooled_diff(df) < 1e-6
