"""The command line: ``fedglmm fit``, ``fedglmm anova``, ``fedglmm summarize``, ``fedglmm demo``, ``fedglmm site ...``,
``fedglmm coordinator ...``, ``fedglmm certs`` and ``fedglmm --version``.

Output contract:

* stdout carries the result only: the printed summary, or the JSON of the fit with ``--json -``;
* stderr carries progress (``round 3: evaluate``, only when stderr is a terminal and ``--quiet`` is not
  given), notes, and errors;
* every error is ONE line ``error: <message>`` on stderr and nothing is printed as a fit.  Exit codes:
  0 success, 1 a data problem (:class:`~fedglmm.errors.FedGLMMError`: unreadable file, bad values, sites
  that disagree, no convergence), 2 a usage problem (unknown option, missing argument, unknown family or
  link, a formula that does not parse), 3 an internal error (``--debug`` shows its traceback).
"""
from . import anova as _anova_command, fit as _fit_commands, site as _site_commands  # noqa: F401 - registers
from .app import EXIT_DATA, EXIT_INTERNAL, EXIT_USAGE, app, main
from .fit import DEMO_FAMILY, DEMO_FILE, DEMO_FORMULA, DEMO_SITE_COLUMN

__all__ = ["app", "main", "EXIT_DATA", "EXIT_USAGE", "EXIT_INTERNAL", "DEMO_FILE", "DEMO_FORMULA", "DEMO_FAMILY",
           "DEMO_SITE_COLUMN"]
