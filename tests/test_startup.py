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

