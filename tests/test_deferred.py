"""fedglmm.model.deferred: formulaic's eager import of scipy.sparse.linalg (and with it scipy.linalg) is
deferred, so a fit with one grouping factor loads neither; and whoever uses the module still gets it --
by attribute, by ``from ... import``, through a submodule import, or through formulaic itself."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_small_fit_loads_no_scipy_linalg():
    out = _run("""
        import sys
        from importlib import resources
        import pandas as pd
        import fedglmm
        df = pd.read_csv(resources.files("fedglmm") / "data" / "contraception.csv")
        res = fedglmm.fit("use ~ urban + age + (1 | district)", df, family="binomial", site="region")
        print(res.converged, "scipy.linalg" in sys.modules, type(sys.modules["scipy.sparse.linalg"]).__name__)
    """)
    assert out == "True False _Deferred"


def test_the_deferred_module_is_the_real_one_on_use():
    out = _run("""
        import sys
        import fedglmm.model.design
        import scipy.sparse, scipy.sparse.linalg as early
        from scipy.sparse.linalg import splu
        real = sys.modules["scipy.sparse.linalg"]
        import scipy.sparse.linalg._interface as interface
        from formulaic.transforms import contrasts
        print(type(real).__name__, scipy.sparse.linalg is real, early.splu is splu is real.splu,
              contrasts.scipy.sparse.linalg.inv is real.inv, interface.LinearOperator is real.LinearOperator)
    """)
    assert out == "module True True True True"


def test_scipys_blas_loaded_during_a_fit_is_held_at_one_thread():
    """scipy.linalg imported inside single_blas (a fit with several grouping factors loads it there, now that
    start-up does not) runs its BLAS at one thread like the libraries loaded before."""
    out = _run("""
        import numpy
        from threadpoolctl import ThreadpoolController
        from fedglmm.likelihood.blas import single_blas
        with single_blas():
            import scipy.linalg
            inside = [i["num_threads"] for i in ThreadpoolController().info() if i["user_api"] == "blas"]
        print(len(inside) >= 2, set(inside))
    """)
    assert out == "True {1}"
