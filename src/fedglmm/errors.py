"""User-facing errors.

Every problem a user can cause (bad data, a formula that does not parse, sites that disagree) is raised
as a :class:`FedGLMMError` whose message is one line naming what is wrong and where.  The command line
prints that line and exits non-zero; it never shows a traceback for these.
"""


class FedGLMMError(Exception):
    """Base class: a one-line, user-facing problem."""


class InputError(FedGLMMError):
    """Bad input: data, formula, family or options."""


class SchemaError(InputError):
    """Sites disagree about columns, types or groups."""


class SiteRefusal(FedGLMMError):
    """A site refused a request (a disclosure rule, or an error inside the site)."""


class ConvergenceError(FedGLMMError):
    """The optimiser could not produce a fit."""


class SiteRestarted(FedGLMMError):
    """A site came back with a new process during a round whose replies must come from one set of keys
    (secure aggregation): raised by a transport that can tell, once the site is back; the round is then
    asked again."""

    def __init__(self, site: str, message: str = ""):
        super().__init__(message or f"site '{site}' restarted")
        self.site = site
