"""BLAS held at one thread while a fit runs (fedglmm.likelihood.blas): the limit holds inside the block,
in the sites' threads and in nested blocks, and the caller's setting comes back afterwards."""
import numpy as np
import pytest

from fedglmm.likelihood import blas

threadpoolctl = pytest.importorskip("threadpoolctl")


def _threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}


def test_single_blas_limits_and_restores():
    if not _threads():
        pytest.skip("no BLAS library that threadpoolctl can see")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _threads()
        with blas.single_blas():
            assert _threads() == {1}
            with blas.single_blas():
                assert _threads() == {1}
            assert _threads() == {1}               # the outer block still holds
        assert _threads() == before


def test_a_fit_runs_with_one_blas_thread(monkeypatch):
    """The sites' answers and the coordinator's work see one BLAS thread; afterwards the setting is back."""
    if not _threads():
        pytest.skip("no BLAS library that threadpoolctl can see")
    import fedglmm
    from fedglmm.site.site import Site

    seen = []
    handle = Site.handle

    def spy(self, data, session=None):
        seen.append(_threads())
        return handle(self, data, session)

    monkeypatch.setattr(Site, "handle", spy)
    rng = np.random.default_rng(3)
    import pandas as pd
    g = np.repeat(np.arange(40), 10)
    df = pd.DataFrame({"x": rng.normal(size=400), "g": g})
    df["y"] = 1 + df["x"] + rng.normal(size=40)[g] + rng.normal(size=400)
    df["site"] = g % 3
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _threads()
        fedglmm.fit("y ~ x + (1 | g)", df, site="site")
        assert _threads() == before
    assert seen and all(s == {1} for s in seen)
