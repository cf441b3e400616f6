"""The console script pauses the garbage collector only while a fit's imports load: the fit itself (from
data or from summary files) runs with it on, the import-time objects frozen out of its passes, and it
runs after the command."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def _console(args: list[str], patch: str) -> str:
    """Run ``fedglmm args`` through the console script's main() in a fresh process, with the API function
    ``patch`` replaced by one that prints whether the collector runs and how many objects are frozen."""
    code = textwrap.dedent(f"""
        import gc, sys
        import fedglmm.api as api
        from fedglmm.errors import InputError

        def probe(*a, **k):
            print("fit:", gc.isenabled(), gc.get_freeze_count() > 0)
            raise InputError("stop")

        setattr(api, {patch!r}, probe)
        from fedglmm.cli import main
        sys.argv = ["fedglmm"] + {args!r}
        try:
            main()
        except SystemExit:
            pass
        print("after:", gc.isenabled())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return r.stdout.strip()


def test_a_fit_runs_with_the_collector_on(tmp_path):
    assert _console(["demo", "-q"], "fit_request_on_data") == "fit: True True\nafter: True"
    summary = tmp_path / "a.json"
    summary.write_text("{}")
    out = _console(["fit", "-f", "y ~ x + (1 | g)", "--family", "binomial", "--summaries", str(summary)],
                   "fit_summaries")
    assert out == "fit: True True\nafter: True"



def test_a_small_logit_fit_loads_no_scipy_special():
    """The demo (a binary logit fit over 4 sites, the hybrid) needs nothing from scipy.special: its import
    cost a small fit 0.06-0.08 s of its ~1 s.  The logit link's mean and link function are numpy's, the
    hybrid's compressed pseudo rows leave out the binomial coefficients only scipy's gammaln gives, and
    the pooled small groups' quantiles load it only when drawn."""
    code = textwrap.dedent("""
        import sys
        from fedglmm.cli import main
        sys.argv = ["fedglmm", "demo", "-q"]
        try:
            main()
        except SystemExit:
            pass
        print(any(m.startswith("scipy.special") for m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout[-300:] + r.stderr[-300:]


def test_logit_link_functions_are_scipys_to_the_last_bits():
    """Written in numpy to spare the import, the logit link and its inverse give scipy's values to 2 units in
    the last place (scipy's logit switches to log1p(s) − log1p(−s), s = 2μ − 1, on [0.3, 0.65]).  Bit for
    bit up to scipy 1.16; scipy 1.17 takes log and exp from the C library, and numpy's vectorised ones
    differ from those in the last bit or two (355 of these 20,006 μ, 656 of the 40,002 η)."""
    import numpy as np
    from scipy import special

    from fedglmm.model.families import get_family

    def ulps(a, b):
        return float(np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(b), np.finfo(float).tiny))))

    fam = get_family("binomial")
    mu = np.r_[np.linspace(1e-9, 1 - 1e-9, 20001), 0.3, 0.65, 0.5, np.nextafter(0.3, 0), np.nextafter(0.65, 1)]
    assert ulps(fam.linkfun(mu), special.logit(mu)) <= 2.0
    assert fam.linkfun(np.r_[0.5])[0] == 0.0
    assert all(abs(float(fam.linkfun(m)) - float(special.logit(m))) <= 2.0 * np.spacing(abs(float(special.logit(m))))
               for m in mu[::97] if m != 0.5)
    eta = np.r_[np.linspace(-800, 800, 40001), 0.0]
    assert ulps(fam.mean(eta), special.expit(eta)) <= 2.0
